"""``lora-search evaluate RUN_DIR``: score every sampled epoch of a run and mark the best."""

from __future__ import annotations

import argparse
from pathlib import Path

from evaluation.cli_options import add_evaluator_options, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score every epoch of a run; writes scores.json and contact sheets",
        description="Score each epoch that has sample images with the CLIP-weighted evaluator "
                    "(configs/evaluator.toml); an epoch checkpoint without samples is sampled first with the "
                    "run's prompt file. Writes RUN_DIR/scores.json and RUN_DIR/contact_sheet_eNNNNNN.png "
                    "and prints a table.")
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path)
    add_evaluator_options(parser)
    parser.set_defaults(func=run)


def format_table(scores) -> str:
    """Epoch, each component, total; the best epoch marked with ``*``."""
    from evaluation.settings import COMPONENTS

    names = list(COMPONENTS)
    header = ["epoch", *names, "total", ""]
    rows = [[str(e.epoch), *(f"{e.components[n]:.3f}" for n in names), f"{e.total:.3f}",
             "* best" if e.epoch == scores.best_epoch else ""] for e in scores.epochs]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from evaluation.evaluator import evaluate_run

    settings = settings_from_args(args)
    scores = evaluate_run(args.run_dir, settings)
    if scores.generated_epochs:
        print(f"sampled epochs {', '.join(map(str, scores.generated_epochs))} from their checkpoints")
    print(format_table(scores))
    print(f"best epoch {scores.best_epoch} (total {scores.best.total:.3f}); "
          f"scores in {scores.scores_path}, contact sheets in {scores.run_dir}/contact_sheet_e*.png")
    return 0
