"""Options shared by the subcommands that touch a study."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from search.settings import StudySettings, load_settings

DEFAULT_STUDY_CONFIG = Path("configs/study.toml")


def add_study_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="STUDY.toml", default=None,
                        help=f"study config (default: {DEFAULT_STUDY_CONFIG} when it exists)")
    parser.add_argument("--study", metavar="NAME", default=None, help="study name (overrides the config)")
    parser.add_argument("--storage", metavar="URL", default=None,
                        help="Optuna storage URL: sqlite:///PATH, postgresql://..., journal:PATH")


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    path = args.config or (DEFAULT_STUDY_CONFIG if DEFAULT_STUDY_CONFIG.is_file() else None)
    return load_settings(path, study=args.study, storage=args.storage,
                         n_trials=getattr(args, "n_trials", None))


def setup_logging(verbose: bool = True) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S", force=True)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
