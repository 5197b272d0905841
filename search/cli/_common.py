"""Options shared by the subcommands that touch a study."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from search.settings import StudySettings, load_settings
from search.tmux import STORAGE_ENV, default_socket_name

DEFAULT_STUDY_CONFIG = Path("configs/study.toml")


def add_study_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="STUDY.toml", default=None,
                        help=f"study config (default: {DEFAULT_STUDY_CONFIG} when it exists)")
    parser.add_argument("--study", metavar="NAME", default=None, help="study name (overrides the config)")
    parser.add_argument("--storage", metavar="URL", default=None,
                        help="Optuna storage URL: sqlite:///PATH, postgresql://..., journal:PATH (default: "
                             f"${STORAGE_ENV}, else the config's storage); prefer ${STORAGE_ENV} for a URL "
                             "with a password, which ps shows on a command line")


def add_socket_option(parser: argparse.ArgumentParser) -> None:
    """``--socket-name``: the tmux socket of lora-search's own tmux server."""
    parser.add_argument("--socket-name", metavar="NAME", default=None,
                        help=f"tmux socket of lora-search's own tmux server (default: {default_socket_name()})")


def config_path(args: argparse.Namespace) -> Optional[Path]:
    """The study config file in use: ``--config``, else configs/study.toml when it exists."""
    if args.config:
        return Path(args.config)
    return DEFAULT_STUDY_CONFIG if DEFAULT_STUDY_CONFIG.is_file() else None


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    """The study settings: the config file overridden by ``$LORA_SEARCH_STORAGE``, then by the flags."""
    storage = args.storage if args.storage is not None else os.environ.get(STORAGE_ENV) or None
    return load_settings(config_path(args), study=args.study, storage=storage,
                         n_trials=getattr(args, "n_trials", None))


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record is logged (it may be replaced after set-up)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LineFormatter(logging.Formatter):
    """``time message``; a warning or an error says which (``time warning: message``)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.levelno < logging.WARNING:
            return super().formatMessage(record)
        return f"{record.asctime} {record.levelname.lower()}: {record.message}"


PACKAGES = ("search", "training", "evaluation")


def setup_logging(verbose: bool = True) -> None:
    """Print every log line once, on stdout: lora-search's progress, and the warnings of libraries that log
    through the standard loggers (diffusers and transformers keep their own stderr handler).

    The one handler sits on the root logger. A handler there also keeps a library's ``logging.info()``
    call (open_clip makes them while loading CLIP) from installing Python's default stderr handler,
    which would print each line a second time.
    """
    handler = _CurrentStdout()
    handler.setFormatter(_LineFormatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _CurrentStdout)] + [handler]
    for name in PACKAGES:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
