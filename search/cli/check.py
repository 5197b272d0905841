"""``lora-search check CONFIG.toml``: validate a training config and the seven safety constraints."""

from __future__ import annotations

import argparse

from search.constraints import CONSTRAINTS, describe, violations
from training.config import load_training_config
from training.vram import vram_line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "check", help="validate a training TOML and the seven safety constraints",
        description="Exit 0 when the config is safe, 1 listing every violated constraint, "
                    "2 when the file is unusable (missing, not TOML, unknown key or bad value).")
    parser.add_argument("config", metavar="CONFIG.toml",
                        help="training config to check (.toml, sd-scripts key names), e.g. an exported trial")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_training_config(args.config)
    fired = violations(cfg)
    if not fired:
        print(f"{args.config}: safe ({len(CONSTRAINTS)} safety constraints checked)")
        print(vram_line(cfg))
        return 0
    print(f"{args.config}: UNSAFE, {len(fired)} of {len(CONSTRAINTS)} safety constraints violated:")
    for constraint in fired:
        print(f"  - {describe(constraint)}")
    print(vram_line(cfg))
    return 1
