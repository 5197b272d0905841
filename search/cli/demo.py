"""``lora-search demo``: the whole pipeline in the toy world (a small pretrained model), CPU, minutes."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.cli._common import setup_logging


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run a real short study in the toy world: a LoRA learns a character the model never saw "
                     "(CPU, a few minutes)",
        description="Runs a real short study on the toy world's small pretrained Stable Diffusion model: a "
                    "constraint rejection, trials trained by the built-in trainer, every epoch scored by the "
                    "toy CLIP, export of the best trial, and which trial learned the held-out character.")
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="demo folder (default: runs/demo)")
    parser.add_argument("--n-trials", type=int, default=4, help="trained trials (default: 4)")
    parser.add_argument("--model", choices=("sd1", "sd3"), default="sd1",
                        help="the toy world's SD 1.x model (default) or its SD3 model (MMDiT, rectified flow)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from search.demo import run_demo

    setup_logging()
    print("lora-search demo: a toy world of coloured shapes, with a small Stable Diffusion model and CLIP "
          "trained on it (toyworld/); the LoRA learns a pink star the model has never seen.")
    paths = run_demo(Path(args.out), args.n_trials, model=args.model)
    print(f"\nexported the best trial to {paths.export} (lora-search check {paths.export} validates it)")
    print(f"contact sheets:      {paths.root}/demo/trial_NNNN/contact_sheet_e*.png")
    print(f"open the dashboard:  lora-search dashboard --config {paths.study_config}")
    print(f"the table again:     lora-search status --config {paths.study_config}")
    return 0
