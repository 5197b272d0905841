"""``lora-search evaluate RUN_DIR``: score every sampled epoch and step of a run and mark the best."""

from __future__ import annotations

import argparse
from pathlib import Path

from evaluation.cli_options import add_evaluator_options, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score every epoch and step checkpoint of a run; writes scores.json and contact sheets",
        description="Score each epoch and step that has sample images with the CLIP-weighted evaluator "
                    "(configs/evaluator.toml); an epoch or step checkpoint without samples is sampled first with "
                    "the run's prompt file. Writes RUN_DIR/scores.json and RUN_DIR/contact_sheet_*.png "
                    "and prints a table in training order.")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                        help="a training run's output_dir (a trial folder runs/<study>/trial_NNNN works too)")
    add_evaluator_options(parser)
    parser.set_defaults(func=run)


def format_table(scores) -> str:
    """Checkpoint (``epoch N`` or ``step N``, in training order), each component, total; the best marked ``*``."""
    from evaluation.settings import COMPONENTS

    names = list(COMPONENTS)
    header = ["checkpoint", *names, "total", ""]
    rows = [[e.label, *(f"{e.components[n]:.3f}" for n in names), f"{e.total:.3f}",
             "* best" if e is scores.best else ""] for e in scores.checkpoints]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from evaluation.evaluator import evaluate_run

    settings = settings_from_args(args)
    scores = evaluate_run(args.run_dir, settings)
    if scores.generated:
        print(f"sampled {', '.join(p.label for p in scores.generated)} from their checkpoints")
    print(format_table(scores))
    checkpoint = f", {scores.best.checkpoint}" if scores.best.checkpoint else ""
    print(f"best {scores.best.label} (total {scores.best.total:.3f}{checkpoint}); "
          f"scores in {scores.scores_path}, contact sheets in {scores.run_dir}/contact_sheet_*.png")
    return 0
