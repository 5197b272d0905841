"""``lora-search train CONFIG.toml [--resume]``: one training run with the built-in trainer."""

from __future__ import annotations

import argparse
import logging


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train one LoRA from a kohya-style TOML config",
                                   description="Train one LoRA from a kohya-style TOML config.")
    parser.add_argument("config", help="training config (.toml, sd-scripts key names)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete training state in output_dir")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.config import load_training_config
    from training.trainer import train

    cfg = load_training_config(args.config)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
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
