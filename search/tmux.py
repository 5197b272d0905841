"""The study's tmux session: one worker window per GPU and a monitor window, on lora-search's own socket.

Workers run in a tmux session named after the study, on a tmux server of their own (socket
``lora-search-<user>`` unless ``--socket-name`` says otherwise), so they outlive the terminal and never
mix with the user's own tmux sessions. Window ``worker-gpu<N>`` runs ``lora-search worker`` with
``CUDA_VISIBLE_DEVICES=N``; window ``monitor`` runs ``lora-search status`` every
``MONITOR_SECONDS``. ``remain-on-exit`` keeps a finished or crashed worker's pane (its last output and
exit status) until the session is stopped.

The storage URL reaches the windows through the session's environment (``LORA_SEARCH_STORAGE``), never
through a command line, so a database password does not show in ``ps`` (see :func:`set_session_storage`).
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from search.errors import LoraSearchError
from search.settings import StudySettings

WORKER_PREFIX = "worker-gpu"
MONITOR_WINDOW = "monitor"
MONITOR_SECONDS = 30
# Crashed workers print tracebacks after hours of progress lines; keep enough scrollback to read them.
HISTORY_LIMIT = 50000
# Set in every window, so that `lora-search status` in the monitor finds the session on a custom socket.
SOCKET_ENV = "LORA_SEARCH_SOCKET"
# The storage URL of the study, read by every subcommand's --storage default. Windows get it in their
# environment: a command line is readable by every user in `ps`, a process environment only by its owner.
STORAGE_ENV = "LORA_SEARCH_STORAGE"
# The environment a worker needs to run the same installation as the shell that ran `start`. The
# tmux server keeps the environment it was started with, which may be an older shell's.
_PASSED_ENV = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX", "HF_HOME", "HF_HUB_OFFLINE")


class TmuxError(LoraSearchError):
    """tmux is missing, or the study's session is (or is not) running when it should not (or should) be."""


@dataclass
class WindowInfo:
    """One worker window: its GPU, whether its worker still runs, and its exit status once it ended
    (128 + N when a signal N killed it; None while it runs)."""

    name: str
    gpu: Optional[int]
    alive: bool
    exit_status: Optional[int]


def default_socket_name() -> str:
    """``$LORA_SEARCH_SOCKET`` (set inside the session's windows) or ``lora-search-<user>``: one tmux
    server per user, apart from the user's own tmux."""
    if os.environ.get(SOCKET_ENV):
        return os.environ[SOCKET_ENV]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = str(os.getuid())
    return f"lora-search-{re.sub(r'[^A-Za-z0-9_-]', '_', user)}"


def session_name(settings: StudySettings) -> str:
    """The tmux session name of a study (tmux does not allow '.' or ':' in session names)."""
    return re.sub(r"[.:]", "_", settings.study.name)


def require_tmux() -> str:
    """The path of the tmux program; a clear error with the install hint when there is none."""
    path = shutil.which("tmux")
    if path is None:
        raise TmuxError("tmux is not installed; install it (apt-get install tmux / brew install tmux) "
                        "or run one worker in this terminal with lora-search start --foreground")
    return path


def parse_gpus(text: str) -> list[int]:
    """``"0,1"`` -> ``[0, 1]``; one error naming the value when it is not a list of distinct GPU numbers."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise TmuxError(f"--gpus '{text}': use distinct comma-separated GPU numbers such as 0,1")
    return [int(p) for p in parts]


def _server(socket_name: Optional[str]):
    import libtmux

    return libtmux.Server(socket_name=socket_name or default_socket_name())


def find_session(settings: StudySettings, socket_name: Optional[str] = None):
    """The study's libtmux Session, or None when tmux is missing or the session does not run."""
    if shutil.which("tmux") is None:
        return None
    server = _server(socket_name)
    if not server.is_alive():
        return None
    return server.sessions.get(session_name=session_name(settings), default=None)


def session_running(settings: StudySettings, socket_name: Optional[str] = None) -> bool:
    return find_session(settings, socket_name) is not None


def study_cli_args(settings: StudySettings, config: Optional[Path]) -> list[str]:
    """The options that, with the storage URL in the session's environment (:func:`set_session_storage`),
    make a subcommand run on exactly this study (config path made absolute). A ``--n-trials`` budget is
    not among them: the study remembers it (search.study.remember_launch)."""
    args = ["--config", str(Path(config).resolve())] if config else []
    args += ["--study", settings.study.name]
    return args


def worker_command(study_args: Sequence[str]) -> str:
    """The shell command a worker window runs: this same Python and installation."""
    return shlex.join([sys.executable, "-m", "search", "worker", *study_args])


def monitor_command(study_args: Sequence[str], seconds: int = MONITOR_SECONDS) -> str:
    """A shell loop that clears the window and prints ``lora-search status`` every ``seconds``."""
    status = shlex.join([sys.executable, "-m", "search", "status", *study_args])
    note = shlex.quote(f"refreshed every {seconds} s; Ctrl-b d detaches, Ctrl-b n shows the next window")
    return f"while :; do clear; {status}; echo; date; echo {note}; sleep {int(seconds)}; done"


def _environment(socket_name: str, gpu: Optional[int] = None) -> dict[str, str]:
    env = {key: os.environ[key] for key in _PASSED_ENV if os.environ.get(key)}
    env[SOCKET_ENV] = socket_name
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def start_session(settings: StudySettings, gpus: Sequence[int], study_args: Sequence[str],
                  socket_name: Optional[str] = None, cwd: Optional[Path] = None,
                  monitor_seconds: int = MONITOR_SECONDS):
    """Create the study's session: a monitor window and one worker window per GPU; returns the Session.

    ``study_args`` are the options that select the study (see :func:`study_cli_args`); windows start
    in ``cwd`` (default: here) so the study config's relative paths mean the same as for ``start``.
    """
    from libtmux import exc as tmux_exc

    require_tmux()
    socket_name = socket_name or default_socket_name()
    server = _server(socket_name)
    name = session_name(settings)
    if server.is_alive() and server.has_session(name, exact=True):
        raise already_running(settings, socket_name)
    cwd = str(Path(cwd or os.getcwd()).resolve())
    try:
        # The monitor waits until the storage URL is in the session's environment (it cannot be on
        # this command line: a tmux server shows the command line that started it for its whole life).
        session = server.new_session(session_name=name, window_name=MONITOR_WINDOW, attach=False,
                                     window_command="sleep 3600", start_directory=cwd,
                                     environment=_environment(socket_name))
    except tmux_exc.TmuxSessionExists:  # another `start` won the race
        raise already_running(settings, socket_name) from None
    try:
        set_session_storage(socket_name, name, settings.study.storage)
    except TmuxError:
        session.kill()  # leave no session whose windows would run on the wrong storage
        raise
    # Server-wide on lora-search's own socket, set before the workers start so that a worker that
    # crashes at once still leaves its pane and exit status behind.
    server.cmd("set-option", "-g", "-w", "remain-on-exit", "on")
    server.cmd("set-option", "-g", "history-limit", str(HISTORY_LIMIT))
    session.windows[0].panes[0].cmd("respawn-pane", "-k", "-c", cwd, monitor_command(study_args, monitor_seconds))
    for gpu in gpus:
        _new_worker_window(session, gpu, study_args, socket_name, cwd)
    return session


def set_session_storage(socket_name: str, name: str, url: str) -> None:
    """Put the storage URL into tmux session ``name``'s environment, which every window started later
    inherits as ``$LORA_SEARCH_STORAGE`` (empty: the study config's storage).

    The command goes to tmux on its standard input, as any tmux command line shows in ``ps``. Set even
    when empty, since the tmux server's own environment may hold another study's URL.
    """
    if "\n" in url or "\r" in url:
        raise TmuxError("the storage URL contains a line break; remove it from --storage or the study config")
    command = f"set-environment -t {_tmux_quote('=' + name)} {STORAGE_ENV} {_tmux_quote(url)}\n"
    done = subprocess.run([require_tmux(), "-L", socket_name, "source-file", "-"], input=command, text=True,
                          capture_output=True)
    if done.returncode != 0:
        raise TmuxError(f"tmux could not set the storage of session '{name}' ({done.stderr.strip()}); "
                        f"end it with lora-search stop and start again")


def _new_worker_window(session, gpu: int, study_args: Sequence[str], socket_name: str, cwd: str) -> None:
    session.new_window(window_name=f"{WORKER_PREFIX}{gpu}", window_shell=worker_command(study_args),
                       environment=_environment(socket_name, gpu), start_directory=cwd, attach=False)


def _tmux_quote(text: str) -> str:
    # tmux's command syntax: nothing is special inside single quotes; a quote itself goes in double quotes.
    return "'" + text.replace("'", "'\"'\"'") + "'"


def restart_workers(settings: StudySettings, study_args: Sequence[str], gpus: Optional[Sequence[int]] = None,
                    socket_name: Optional[str] = None, cwd: Optional[Path] = None) -> list[str]:
    """Bring back worker windows whose worker died, and create missing ones; returns the windows started.

    ``gpus`` None means the GPUs of the session's existing worker windows. Without a session, a new
    one is started (on ``gpus``, default GPU 0). Live workers are left alone, so on a healthy session
    this does nothing.
    """
    socket_name = socket_name or default_socket_name()
    session = find_session(settings, socket_name)
    if session is None:
        gpus = list(gpus) if gpus is not None else [0]
        start_session(settings, gpus, study_args, socket_name=socket_name, cwd=cwd)
        return [f"{WORKER_PREFIX}{g}" for g in gpus]
    cwd = str(Path(cwd or os.getcwd()).resolve())
    set_session_storage(socket_name, session_name(settings), settings.study.storage)
    panes = dict(_worker_panes(session))
    wanted = [f"{WORKER_PREFIX}{g}" for g in gpus] if gpus is not None else list(panes)
    started = []
    for name in wanted:
        gpu = int(name[len(WORKER_PREFIX):])
        if name not in panes:
            _new_worker_window(session, gpu, study_args, socket_name, cwd)
        elif not _window_info(name, panes[name]).alive:
            env = [f"-e{key}={value}" for key, value in _environment(socket_name, gpu).items()]
            panes[name].cmd("respawn-pane", "-c", cwd, *env, worker_command(study_args))
        else:
            continue
        started.append(name)
    return started


def already_running(settings: StudySettings, socket_name: Optional[str]) -> TmuxError:
    flags = _cli_flags(settings, socket_name)
    return TmuxError(f"study '{settings.study.name}' already runs in tmux session '{session_name(settings)}'; "
                     f"watch it with lora-search attach{flags} or end it with lora-search stop{flags}")


def _cli_flags(settings: StudySettings, socket_name: Optional[str]) -> str:
    flags = f" --study {shlex.quote(settings.study.name)}"
    if socket_name and socket_name != default_socket_name():
        flags += f" --socket-name {shlex.quote(socket_name)}"
    return flags


def _worker_panes(session) -> list[tuple[str, object]]:
    return [(w.window_name, w.panes[0]) for w in session.windows
            if re.fullmatch(rf"{WORKER_PREFIX}\d+", w.window_name or "") and w.panes]


def _window_info(name: str, pane) -> WindowInfo:
    dead = pane.pane_dead == "1"
    status: Optional[int] = None
    if dead and pane.pane_dead_status not in (None, ""):
        status = int(pane.pane_dead_status)
    elif dead and pane.pane_dead_signal not in (None, ""):
        status = 128 + int(pane.pane_dead_signal)  # as a shell reports it: kill -9 shows 137
    return WindowInfo(name=name, gpu=int(name[len(WORKER_PREFIX):]), alive=not dead, exit_status=status)


def worker_windows(settings: StudySettings, socket_name: Optional[str] = None) -> list[WindowInfo]:
    """The study's worker windows with GPU and liveness; empty when no session runs (or no tmux)."""
    session = find_session(settings, socket_name)
    if session is None:
        return []
    return [_window_info(name, pane) for name, pane in _worker_panes(session)]


@dataclass
class StopReport:
    """What :func:`stop_session` did."""

    session: str
    interrupted: list[str]  # worker windows sent Ctrl-C
    windows: list[WindowInfo]  # every worker window as it was when the session was killed

    @property
    def still_running(self) -> list[str]:
        return [w.name for w in self.windows if w.alive]


def stop_session(settings: StudySettings, socket_name: Optional[str] = None, timeout: float = 300.0,
                 poll: float = 0.5) -> Optional[StopReport]:
    """Ctrl-C each running worker, wait up to ``timeout`` s for them to exit, then kill the session.

    Returns None when the study's session does not run.
    """
    session = find_session(settings, socket_name)
    if session is None:
        return None
    interrupted = []
    for name, pane in _worker_panes(session):
        if _window_info(name, pane).alive:
            pane.send_keys("C-c", enter=False)  # SIGINT: the worker records the trial and exits
            interrupted.append(name)
    deadline = time.monotonic() + timeout
    windows = worker_windows(settings, socket_name)
    while any(w.alive for w in windows) and time.monotonic() < deadline:
        time.sleep(poll)
        windows = worker_windows(settings, socket_name)
    windows = _with_exit_status(settings, socket_name, windows)
    session.kill()
    return StopReport(session=session_name(settings), interrupted=interrupted, windows=windows)


def _with_exit_status(settings: StudySettings, socket_name: Optional[str], windows: list[WindowInfo],
                      grace: float = 3.0) -> list[WindowInfo]:
    """tmux marks a pane dead when its pty closes and fills in the exit status when it reaps the process,
    which can lag (or, seen with tmux 3.3a, not happen at all): wait briefly, never for the whole timeout."""
    deadline = time.monotonic() + grace
    while any(not w.alive and w.exit_status is None for w in windows) and time.monotonic() < deadline:
        time.sleep(0.2)
        windows = worker_windows(settings, socket_name)
    return windows


def attach_argv(settings: StudySettings, socket_name: Optional[str] = None) -> list[str]:
    """The tmux command line that attaches this terminal to the study's session (which must run)."""
    tmux = require_tmux()
    if not session_running(settings, socket_name):
        raise TmuxError(f"no tmux session for study '{settings.study.name}' on socket "
                        f"'{socket_name or default_socket_name()}'; start it with lora-search start"
                        f"{_cli_flags(settings, socket_name)}")
    return [tmux, "-L", socket_name or default_socket_name(), "attach-session", "-t", f"={session_name(settings)}"]
