"""``lora-search demo``: the whole pipeline on a tiny built-in model and synthetic data, CPU, minutes."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.cli._common import setup_logging


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline end to end on a tiny model and synthetic data (CPU, minutes)",
        description="Builds a tiny random-weight SD model and CLIP, a synthetic character dataset, and runs a "
                    "real short study: rejections, training, CLIP scoring, pruning, export.")
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="demo folder (default: runs/demo)")
    parser.add_argument("--n-trials", type=int, default=3, help="trained trials (default: 3)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from search.demo import run_demo

    setup_logging()
    print("lora-search demo: the models here are tiny and random, so every image they make is noise. "
          "Real use needs a real checkpoint (see README).")
    paths = run_demo(Path(args.out), args.n_trials)
    print(f"\nexported the best trial to {paths.export} (lora-search check {paths.export} validates it)")
    print(f"open the dashboard:  lora-search dashboard --config {paths.study_config}")
    print(f"the table again:     lora-search status --config {paths.study_config}")
    print("reminder: the demo's images are noise from a random tiny model; point configs/base.toml at your "
          "own checkpoint and dataset for real use")
    return 0
