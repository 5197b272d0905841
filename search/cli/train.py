"""``lora-search train CONFIG.toml [--resume]``: one training run with the built-in trainer."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train one LoRA from a kohya-style TOML config",
                                   description="Train one LoRA from a kohya-style TOML config.")
    parser.add_argument("config", help="training config (.toml, sd-scripts key names)")
    from training.presets import available_presets

    parser.add_argument("--preset", metavar="NAME", default=None,
                        help=f"{', '.join(available_presets())} (configs/presets/), or a preset .toml, laid over "
                             "the config")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete training state in output_dir")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from search.cli._common import setup_logging
    from training.config import config_from_dict
    from training.presets import load_config_values
    from training.trainer import train

    cfg = config_from_dict(load_config_values(args.config, args.preset), args.config)
    setup_logging()
    _quiet_library_progress()
    result = train(cfg, resume=args.resume)
    print(f"trained {result.epochs} epochs, {result.steps} steps: {result.checkpoint}")
    return 0


def _quiet_library_progress() -> None:
    """Model-loading progress bars from diffusers/transformers would bury the training log."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
