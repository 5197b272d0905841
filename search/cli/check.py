"""``lora-search check CONFIG.toml``: validate a training config and the seven safety constraints.

``lora-search check --study [NAME]`` runs the study's pre-flight check instead (what ``start`` checks
before it creates or detaches anything, see :mod:`search.preflight`), and writes nothing.
"""

from __future__ import annotations

import argparse

from search.cli._common import DEFAULT_STUDY_CONFIG, settings_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "check", help="validate a training TOML and the seven safety constraints, or a whole study (--study)",
        description="Exit 0 when the config is safe, 1 listing every violated constraint, "
                    "2 when the file is unusable (missing, not TOML, unknown key or bad value). With --study: "
                    "the pre-flight check lora-search start runs (configs, model, dataset, prompts, CLIP, "
                    "storage), exit 0 when all is well, 2 naming the first problem.")
    parser.add_argument("config", metavar="CONFIG.toml", nargs="?", default=None,
                        help="training config to check (omit it with --study)")
    parser.add_argument("--study", metavar="NAME", nargs="?", const="", default=None,
                        help="check the study's whole set-up instead (NAME overrides the study config's name)")
    parser.add_argument("--config-file", dest="study_config", metavar="STUDY.toml", default=None,
                        help=f"study config for --study (default: {DEFAULT_STUDY_CONFIG})")
    parser.add_argument("--storage", metavar="URL", default=None, help="storage URL for --study (as for start)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.study is not None:
        return _check_study(args)
    if args.config is None:
        from training.errors import ConfigError

        raise ConfigError("give a training CONFIG.toml, or --study for the study's pre-flight check")
    return _check_config(args.config)


def _check_config(path: str) -> int:
    from search.constraints import CONSTRAINTS, describe, violations
    from search.preflight import describe_model
    from training.config import load_training_config
    from training.vram import vram_line

    cfg = load_training_config(path)
    fired = violations(cfg)
    if not fired:
        print(f"{path}: safe ({len(CONSTRAINTS)} safety constraints checked)")
        print(describe_model(cfg.pretrained_model_name_or_path))
        print(vram_line(cfg))
        return 0
    print(f"{path}: UNSAFE, {len(fired)} of {len(CONSTRAINTS)} safety constraints violated:")
    for constraint in fired:
        print(f"  - {describe(constraint)}")
    print(describe_model(cfg.pretrained_model_name_or_path))
    print(vram_line(cfg))
    return 1


def _check_study(args: argparse.Namespace) -> int:
    from search.preflight import preflight_or_raise

    study_args = argparse.Namespace(config=args.study_config or args.config, study=args.study or None,
                                    storage=args.storage)
    settings = settings_from_args(study_args)
    print(f"pre-flight check of study '{settings.study.name}':")
    preflight_or_raise(settings, say=lambda line: print(f"  ok  {line}"))
    print("all checks passed; lora-search start will not stop on any of these")
    return 0
