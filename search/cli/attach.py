"""``lora-search attach``: attach this terminal to the study's tmux session (Ctrl-b d detaches)."""

from __future__ import annotations

import argparse
import os

from search.cli._common import add_study_options, settings_from_args
from search.cli._common import add_socket_option


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "attach", help="attach to the study's tmux session (Ctrl-b d detaches)",
        description="Attach this terminal to the tmux session lora-search start launched: one window per "
                    "worker and a monitor window. Ctrl-b d detaches and leaves the study running.")
    add_study_options(parser)
    add_socket_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shlex

    from search.tmux import TmuxError, attach_argv

    settings = settings_from_args(args)
    argv = attach_argv(settings, args.socket_name)
    if os.environ.get("TMUX"):
        raise TmuxError("this terminal is already inside tmux; detach first (Ctrl-b d) or nest on purpose "
                        f"with: TMUX= {shlex.join(argv)}")
    os.execvp(argv[0], argv)
    return 0  # not reached: execvp replaces this process
