"""``lora-search tensorboard``: TensorBoard on ``runs/<study>``, every trial's run side by side."""

from __future__ import annotations

import argparse
import sys
import threading

from search.cli._common import add_study_options, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tensorboard", help="TensorBoard on the study's trials: loss, learning rate and scores, one run per trial",
        description="Serves TensorBoard on runs/<study> (the same as `tensorboard --logdir runs/<study>`): each "
                    "trial's logs folder is one run, with loss/current, loss/average, lr/unet, lr/textencoder per "
                    "step and loss/epoch_average and score/* per epoch. Listens on 127.0.0.1 unless --host says "
                    "otherwise.")
    add_study_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=6006, help="port (default: 6006; 0 picks a free one)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from search.dashboard import DashboardError

    settings = settings_from_args(args)
    logdir = settings.study_dir
    if not any(logdir.glob("*/logs")):
        raise DashboardError(f"no trial logs under {logdir}; train a trial first (lora-search start) or pass "
                             "--study / --config for another study")
    board = _tensorboard(str(logdir), args.host, args.port)
    try:
        url = board.launch()
    except Exception as exc:  # TensorBoard reports a busy port and other bind errors as its own exception types
        raise DashboardError(f"TensorBoard cannot listen on {args.host}:{args.port} ({exc}); pass another --port") \
            from None
    print(f"TensorBoard for study '{settings.study.name}' ({logdir}) at {url}  (Ctrl-C stops it)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("tensorboard stopped")
    return 0


def _tensorboard(logdir: str, host: str, port: int):
    from search.dashboard import DashboardError

    try:
        from tensorboard import program
    except ImportError:
        raise DashboardError("the tensorboard package is not installed; pip install tensorboard") from None
    board = program.TensorBoard()
    # the Python loader honours the purge a resumed run writes (its curves keep one point per step)
    board.configure(argv=[sys.argv[0], "--logdir", logdir, "--host", host, "--port", str(port),
                          "--load_fast", "false"])
    return board
