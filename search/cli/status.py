"""``lora-search status``: a table of the study's trials."""

from __future__ import annotations

import argparse

from search.cli._common import add_socket_option, add_study_options, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "status", help="table of trials: state, params, score, best epoch, prune reason",
        description="Print one row per trial (state, sampled params, VRAM estimate, score, best epoch, why "
                    "it was pruned or failed), the constraint rejections, the best trial and the worker "
                    "windows of the tmux session.")
    add_study_options(parser)
    add_socket_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from search.status import status_text, windows_text
    from search.study import open_study
    from search.tmux import worker_windows

    settings = settings_from_args(args)
    study = open_study(settings, create=False)
    print(status_text(study, settings.study.n_trials, settings.scorer.human_weight))
    print(windows_text(worker_windows(settings, args.socket_name)))
    return 0
