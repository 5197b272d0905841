"""optuna-dashboard on a study's storage, with the artifact store the workers upload contact sheets to.

Before it serves, every COMPLETE trial gets its rating form and the top trials their place in the
comparison view (:mod:`search.ratings`), in case a worker finished one without offering it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from search.errors import LoraSearchError
from search.settings import StudySettings


log = logging.getLogger(__name__)


class DashboardError(LoraSearchError):
    """The dashboard cannot listen where it was asked to."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    # A browser loads several API endpoints at once; one slow request must not stall the page.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # the dashboard polls every few seconds; one line per request would bury everything else


def artifact_dir(settings: StudySettings) -> Path:
    """Where the workers upload contact sheets and samples (``runs/<study>/artifacts``)."""
    return settings.study_dir / "artifacts"


def make_dashboard_server(settings: StudySettings, host: str = "127.0.0.1", port: int = 8080) -> WSGIServer:
    """A WSGI server for optuna-dashboard on the study's storage; call ``serve_forever()`` on it.

    ``port=0`` picks a free port (``server.server_port`` says which).
    """
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import wsgi

    from search.study import open_storage, storage_url

    store_dir = artifact_dir(settings)
    store_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(storage_url(settings), settings)
    offer_finished_trials(settings, storage)
    app = wsgi(storage, artifact_store=FileSystemArtifactStore(str(store_dir)))
    try:
        return make_server(host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise DashboardError(f"port {port} on {host} is already in use; pass another --port") from None
        raise DashboardError(f"cannot listen on {host}:{port} ({exc.strerror}); check --host and --port") from None


def offer_finished_trials(settings: StudySettings, storage) -> None:
    """Rating forms for the study's COMPLETE trials that have none (see :mod:`search.ratings`)."""
    import optuna

    from search.ratings import offer_for_judgement

    try:
        study = optuna.load_study(study_name=settings.study.name, storage=storage)
    except KeyError:
        return
    try:
        offer_for_judgement(study, artifact_dir(settings), settings.scorer.compare_top)
    except Exception as exc:  # the dashboard is still worth serving without the forms
        log.warning("rating forms not created (%s: %s)", type(exc).__name__, exc)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
