"""Command-line options every evaluation subcommand shares, and the settings they produce."""

from __future__ import annotations

import argparse

from evaluation.settings import DEFAULT_SETTINGS_PATH, EvaluatorSettings, load_settings


def add_evaluator_options(parser: argparse.ArgumentParser) -> None:
    """``--evaluator-config``, ``--clip-model``, ``--clip-pretrained`` and ``--references``."""
    parser.add_argument("--evaluator-config", metavar="FILE.toml", default=None,
                        help=f"evaluator settings (default: {DEFAULT_SETTINGS_PATH})")
    parser.add_argument("--clip-model", metavar="NAME_OR_local-dir:PATH", default=None,
                        help="open_clip model name, or local-dir:FOLDER with open_clip_config.json and weights")
    parser.add_argument("--clip-pretrained", metavar="FILE", default=None,
                        help="local CLIP weights file for a model name (or a tag in the cache_dir)")
    parser.add_argument("--references", metavar="DIR", default=None, help="folder of reference images")


def settings_from_args(args: argparse.Namespace) -> EvaluatorSettings:
    """Settings from the evaluator config with the command-line overrides applied."""
    settings = load_settings(args.evaluator_config)
    return settings.with_overrides(clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                                   references=args.references)
