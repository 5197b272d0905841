"""``lora-search worker``: pull trials from the shared study until the budget is met."""

from __future__ import annotations

import argparse
import signal

from search.cli._common import add_study_options, settings_from_args, setup_logging


def register(subparsers) -> None:
    parser = subparsers.add_parser("worker", help="train trials of the study until its budget is met",
                                   description="What one tmux window runs; several workers may share a study.")
    add_study_options(parser)
    parser.add_argument("--n-trials", type=int, default=None, help="budget of trained trials (overrides the config)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from search.worker import Worker, trained_count

    setup_logging()
    signal.signal(signal.SIGTERM, _stop_requested)  # `kill`/`lora-search stop`: like Ctrl-C
    settings = settings_from_args(args)
    worker = Worker(settings)
    trained = worker.run()
    print(f"worker done: trained {trained} trial(s) here; study '{settings.study.name}' has "
          f"{trained_count(worker.study)} of {settings.study.n_trials} trained")
    return 0


def _stop_requested(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
