"""``lora-search resume``: after a crash, kill -9 or reboot, bring the study back with nothing lost."""

from __future__ import annotations

import argparse

from search.cli._common import add_study_options, settings_from_args, setup_logging


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "resume", help="fail trials of dead workers, queue them to continue, and restart workers",
        description="Trials whose worker died are failed and re-queued; their retry continues the run from "
                    "its last saved training state. On a healthy study this changes nothing.")
    add_study_options(parser)
    parser.add_argument("--foreground", action="store_true", help="run one worker in this terminal afterwards")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from search.recovery import recover_dead_trials
    from search.study import open_study

    setup_logging()
    settings = settings_from_args(args)
    study = open_study(settings, create=False)
    failed = recover_dead_trials(study, settings.study.max_retry)
    if failed:
        print(f"re-queued {len(failed)} trial(s) of dead workers to continue: {', '.join(map(str, failed))}")
    else:
        print("no trial of a dead worker found")
    if args.foreground:
        from search.worker import Worker

        Worker(settings).run()
    return 0
