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
    from search.preflight import preflight_or_raise

    settings = settings_from_args(args)
    setup_logging()
    preflight_or_raise(settings)  # start has run it too; a worker started by hand gets it here
    return run_worker(settings)


def run_worker(settings) -> int:
    """One worker in this terminal until the budget is met (or a stop is requested).

    Before each trial the model, dataset and prompt file are looked for again: when one vanished
    mid-study the worker stops with that line (exit 2) instead of failing every remaining trial.
    """
    from search.preflight import check_inputs
    from search.trial_config import load_base_values
    from search.worker import Worker, trained_count
    from training.config import config_from_dict

    setup_logging()
    base = config_from_dict(load_base_values(settings.study.base_config, settings.study.preset), "base config")
    worker = Worker(settings)
    worker.before_trial = lambda: check_inputs(base)
    graceful_stop(worker)
    trained = worker.run()
    print(f"worker done: trained {trained} trial(s) here; study '{settings.study.name}' has "
          f"{trained_count(worker.study)} of {settings.study.n_trials} trained")
    return 0


def graceful_stop(worker) -> None:
    """First Ctrl-C or SIGTERM: finish the current epoch, queue the trial to continue, exit. Second: at once."""

    def handler(signum, frame) -> None:
        if worker.stop_requested:
            raise KeyboardInterrupt(f"signal {signum}")
        worker.request_stop()
        print("stop requested: finishing the current epoch, then exiting (send it again to stop at once)",
              flush=True)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
