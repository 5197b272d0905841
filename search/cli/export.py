"""``lora-search export --out FILE.toml [--trial N]``: the best (or named) trial as a production config."""

from __future__ import annotations

import argparse
from pathlib import Path

from search.cli._common import add_study_options, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write the best (or a named) trial as a complete training config",
        description="Write the values the best complete trial (or --trial N) trained with, merged with the "
                    "base config's output paths, as a training config that sd-scripts' train_network.py and "
                    "lora-search train accept. Its header records the score, the best epoch and how it "
                    "compares with the baseline. Nothing is written when the study has no such trial.")
    add_study_options(parser)
    parser.add_argument("--out", required=True, metavar="FILE.toml", help="where to write the config")
    parser.add_argument("--trial", type=int, default=None, metavar="N", help="trial number (default: the best)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from search.export import export_trial
    from search.study import open_study
    from search.trial_config import load_base_values

    settings = settings_from_args(args)
    study = open_study(settings, create=False)
    base = load_base_values(settings.study.base_config, settings.study.preset)
    trial = export_trial(study, base, Path(args.out), args.trial, settings.scorer.human_weight)
    print(f"wrote {args.out} from trial {trial.number} (score {trial.value}); "
          f"check it with: lora-search check {args.out}")
    return 0
