"""``lora-search start``: create or continue the study and run its workers in a tmux session.

The session (named after the study, on lora-search's own tmux socket) has a window ``worker-gpu<N>``
per GPU running ``lora-search worker`` with ``CUDA_VISIBLE_DEVICES=N``, and a window ``monitor``
that reprints ``lora-search status`` every 30 s (a shell loop; ``--monitor-seconds`` changes it).
``--foreground`` runs one worker in this terminal instead, without tmux.

Before anything is created or detached, the pre-flight check (:mod:`search.preflight`) reads every
config and what it points at; a problem is one line and exit 2, with no study, folder or session made.
Then the study is created or continued, trials of dead workers are recovered as ``resume`` does, and
the GPUs (and a ``--n-trials`` budget) are remembered in the study, so ``resume`` brings all of it back.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from search.cli._common import add_socket_option, add_study_options, config_path, settings_from_args
from search.tmux import MONITOR_SECONDS, MONITOR_WINDOW, default_socket_name


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "start", help="create or continue the study and launch its workers in a tmux session",
        description="One tmux window per GPU runs lora-search worker; a monitor window shows "
                    "lora-search status. Detach and go to bed; lora-search attach / stop later.")
    add_study_options(parser)
    parser.add_argument("--n-trials", type=int, default=None, help="budget of trained trials (overrides the config)")
    parser.add_argument("--gpus", metavar="0,1", default=None,
                        help="GPUs, one worker each (default: the GPUs the study was last started with, else 0); "
                             "sets CUDA_VISIBLE_DEVICES per worker window")
    add_socket_option(parser)
    parser.add_argument("--foreground", action="store_true",
                        help="run one worker in this terminal instead of a tmux session")
    parser.add_argument("--baseline", metavar="FILE", default=None,
                        help="your proven training config, trained first and shown as the yardstick "
                             "(overrides [study] baseline_config)")
    parser.add_argument("--monitor-seconds", type=int, default=MONITOR_SECONDS, metavar="S",
                        help=f"how often the monitor window refreshes the status (default: {MONITOR_SECONDS})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from search.preflight import preflight_or_raise
    from search.tmux import TmuxError, parse_gpus

    from search.study import launch_settings

    settings = settings_from_args(args)
    if args.baseline:
        settings.study.baseline_config = args.baseline
    gpus = parse_gpus(args.gpus) if args.gpus is not None else None
    if args.foreground and gpus is not None and len(gpus) > 1:
        raise TmuxError(f"--foreground runs one worker; pass one GPU (--gpus {gpus[0]}) or drop --foreground")
    socket = None if args.foreground else _session_checks(settings, args)
    print(f"pre-flight check of study '{settings.study.name}':")
    preflight_or_raise(settings, tmux=not args.foreground, say=lambda line: print(f"  ok  {line}"))
    study = _open(settings, gpus)
    gpus = launch_settings(study).get("gpus", [0])
    if args.foreground:
        return _foreground(settings, gpus if args.gpus is not None else None)
    return _start_tmux(settings, gpus, args, socket)


def _session_checks(settings, args: argparse.Namespace) -> str:
    """Refuse before anything is made: no tmux, a bad --monitor-seconds, or the study's session running."""
    from search.tmux import TmuxError, already_running, require_tmux, session_running

    require_tmux()
    if args.monitor_seconds < 1:
        raise TmuxError(f"--monitor-seconds {args.monitor_seconds}: use 1 or more")
    socket = args.socket_name or default_socket_name()
    if session_running(settings, socket):
        raise already_running(settings, socket)
    return socket


def _open(settings, gpus: Optional[list[int]]):
    """Create or continue the study, remember the launch, recover dead workers' trials, queue the baseline."""
    import optuna

    from search.recovery import recover_dead_trials
    from search.study import launch_settings, open_study, remember_launch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # start prints its own summary
    study = open_study(settings)
    remember_launch(study, gpus if gpus is not None else launch_settings(study).get("gpus", [0]), settings)
    recovered = recover_dead_trials(study, settings.study.max_retry)
    if recovered:
        print(f"re-queued {len(recovered)} trial(s) of dead workers to continue: {', '.join(map(str, recovered))}")
    if settings.study.baseline_config:
        _queue_baseline(study, settings)
    return study


def _foreground(settings, gpus: Optional[list[int]]) -> int:
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus[0])  # before anything initialises CUDA
    from search.cli.worker import run_worker

    return run_worker(settings)


def _start_tmux(settings, gpus: list[int], args: argparse.Namespace, socket: str) -> int:
    from search.study import redact, storage_url
    from search.tmux import session_name, start_session, study_cli_args

    url = storage_url(settings)
    if len(gpus) > 1 and url.startswith("sqlite"):
        print(f"warning: {len(gpus)} workers will share the SQLite file {url[len('sqlite:///'):]}; SQLite is meant "
              f"for one worker (\"database is locked\"): prefer --storage journal:{settings.study_dir}/journal.log "
              "on one machine or postgresql://... for several", file=sys.stderr)
    study_args = study_cli_args(settings, config_path(args))
    start_session(settings, gpus, study_args, socket_name=socket, monitor_seconds=args.monitor_seconds)
    flags = f" --study {settings.study.name}" + (f" --socket-name {socket}" if args.socket_name else "")
    workers = ", ".join(f"worker-gpu{g} (CUDA_VISIBLE_DEVICES={g})" for g in gpus)
    print(f"study '{settings.study.name}' on {redact(url)}: tmux session '{session_name(settings)}' "
          f"(socket {socket}) runs {workers} and '{MONITOR_WINDOW}' (status every {args.monitor_seconds} s)")
    print(f"  watch it:  lora-search attach{flags}\n  stop it:   lora-search stop{flags}")
    return 0


def _queue_baseline(study, settings) -> None:
    from search.baseline import queue_baseline
    from search.space import load_search_space
    from search.trial_config import load_base_values

    space = load_search_space(settings.study.search_space)
    base = load_base_values(settings.study.base_config, settings.study.preset)
    if queue_baseline(study, settings, space, base):
        print(f"baseline {settings.study.baseline_config} queued as the next trial")
