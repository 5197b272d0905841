"""``lora-search verify-dataset DATA_DIR --references REF_DIR``: the CLIP multi-reference filter."""

from __future__ import annotations

import argparse
from pathlib import Path

from evaluation.cli_options import add_evaluator_options, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify-dataset", help="CLIP multi-reference check of a dataset's images",
        description="An image passes when its best CLIP similarity to any reference image is at least the "
                    "threshold. Writes a CSV report (default DATA_DIR/clip_verify_report.csv); "
                    "--move-rejected moves failures and their caption files out; nothing is deleted.")
    parser.add_argument("data_dir", metavar="DATA_DIR", type=Path,
                        help="dataset folder; its images are found in sub-folders too (N_name kohya layout)")
    add_evaluator_options(parser)
    parser.add_argument("--threshold", type=float, default=None,
                        help="best cosine to any reference needed to pass (default: verify_threshold, 0.75)")
    parser.add_argument("--move-rejected", metavar="DIR", type=Path, default=None,
                        help="move failing images and their .txt/.caption files here (sub-folders kept)")
    parser.add_argument("--report", metavar="FILE.csv", type=Path, default=None,
                        help="where to write the report (default: DATA_DIR/clip_verify_report.csv)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from evaluation.clip_loader import load_clip
    from evaluation.verify import verify_dataset

    settings = settings_from_args(args)
    threshold = args.threshold if args.threshold is not None else settings.verify_threshold
    report = verify_dataset(args.data_dir, Path(settings.references), load_clip(settings.clip), threshold=threshold,
                            move_rejected=args.move_rejected, report_path=args.report)
    print(report.summary())
    moved = sum(c.moved_to is not None for c in report.checks)
    if moved:
        print(f"moved {moved} rejected image(s) with their captions to {args.move_rejected}")
    print(f"report: {report.report_path}")
    return 0
