"""``lora-search resume``: after a crash, kill -9 or reboot, bring the study back with nothing lost."""

from __future__ import annotations

import argparse

from search.cli._common import add_socket_option, add_study_options, config_path, settings_from_args, setup_logging


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "resume", help="fail trials of dead workers, queue them to continue, and restart workers",
        description="Trials whose worker died are failed and re-queued; their retry continues the run from "
                    "its last saved training state. On a healthy study this changes nothing.")
    add_study_options(parser)
    add_socket_option(parser)
    parser.add_argument("--no-workers", action="store_true",
                        help="only recover the trials; do not restart worker windows")
    parser.add_argument("--gpus", metavar="0,1", default=None,
                        help="GPUs for a new session when none runs (default: the session's, else the ones "
                             "lora-search start was given, else 0)")
    parser.add_argument("--foreground", action="store_true",
                        help="run one worker in this terminal afterwards instead of tmux windows")
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
        from search.cli.worker import run_worker

        return run_worker(settings)
    if not args.no_workers:
        _restart_workers(settings, args, study)
    return 0


def _restart_workers(settings, args: argparse.Namespace, study) -> None:
    from optuna.trial import TrialState

    from search.tmux import parse_gpus, restart_workers, study_cli_args
    from search.worker import trained_count

    queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if not queued and trained_count(study) >= settings.study.n_trials:
        print(f"study '{settings.study.name}' has met its budget; no workers to restart")
        return
    from search.study import launch_settings

    gpus = parse_gpus(args.gpus) if args.gpus else launch_settings(study).get("gpus")
    changed = restart_workers(settings, study_cli_args(settings, config_path(args)), gpus=gpus,
                              socket_name=args.socket_name)
    print("restarted: " + ", ".join(changed) if changed else "worker windows: all alive, nothing to restart")
