"""``lora-search stop``: Ctrl-C every worker of the study's tmux session, wait for them, end the session."""

from __future__ import annotations

import argparse

from search.cli._common import add_study_options, settings_from_args
from search.cli._common import add_socket_option

DEFAULT_TIMEOUT = 300.0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stop", help="gracefully stop the study's workers and end its tmux session",
        description="Sends Ctrl-C (SIGINT) to each running worker, waits for them to exit, "
                    "then kills the tmux session. Trials still running then are left for lora-search resume.")
    add_study_options(parser)
    add_socket_option(parser)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"seconds to wait for workers to exit before killing them (default: {DEFAULT_TIMEOUT:g})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from search.tmux import default_socket_name, session_name, stop_session

    settings = settings_from_args(args)
    socket = args.socket_name or default_socket_name()
    name = session_name(settings)
    print(f"stopping study '{settings.study.name}': Ctrl-C to its workers, waiting up to {args.timeout:g} s")
    report = stop_session(settings, socket, timeout=args.timeout)
    if report is None:
        print(f"no tmux session '{name}' on socket {socket}: nothing to stop")
        return 0
    if report.interrupted:
        print("sent Ctrl-C to " + ", ".join(report.interrupted))
    for window in report.windows:
        if window.alive:
            print(f"  {window.name}: still running after {args.timeout:g} s, killed "
                  "(its trial stays RUNNING until lora-search resume)")
        else:
            status = "" if window.exit_status is None else f" with status {window.exit_status}"
            print(f"  {window.name}: exited{status}")
    print(f"killed tmux session '{name}'")
    return 0
