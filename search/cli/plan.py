"""``lora-search plan DATA_DIR``: dataset report, step budget per epoch count, auto-steps, VRAM estimate."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from training.config import config_from_dict, flatten_sections, read_toml, write_config
from training.planning import (DEFAULT_EPOCH_CHOICES, STEPS_PER_IMAGE_RANGE, apply_auto_steps, auto_steps,
                               budget_warning, config_budget, dataset_report, epoch_budgets, format_budget,
                               format_dataset_report)
from training.presets import apply_preset, available_presets
from training.vram import ARCHS, estimate_vram, vram_line

DEFAULT_CONFIG = Path("configs/base.toml")
DEFAULT_SPACE = Path("configs/search_space.toml")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="dataset report, steps per image, step auto-adjust and VRAM estimate",
        description="Report what a dataset folder gives a training config: images, repeats, captions, "
                    "buckets, trigger tokens, the step budget of each candidate epoch count, and the "
                    "estimated GPU memory.")
    parser.add_argument("data_dir", metavar="DATA_DIR", help="folder of N_name subfolders (N = repeats)")
    parser.add_argument("--config", metavar="BASE.toml", default=None,
                        help=f"training config (default: {DEFAULT_CONFIG} when it exists)")
    parser.add_argument("--preset", metavar="NAME", default=None,
                        help=f"preset overlay from configs/presets ({', '.join(available_presets())}) or a .toml file")
    parser.add_argument("--auto-steps", action="store_true",
                        help="40 steps per image clamped to 500..3500, checkpoints every 100/250/500 steps")
    parser.add_argument("--search-space", metavar="SPACE.toml", default=None,
                        help=f"candidate max_train_epochs from this space (default: {DEFAULT_SPACE} when it exists)")
    parser.add_argument("--arch", choices=ARCHS, default=None,
                        help="model architecture for the VRAM estimate (default: read from the model file)")
    parser.add_argument("--out", metavar="FILE.toml", default=None,
                        help="write the resulting config (base + preset + auto-steps) here")
    parser.set_defaults(func=run)


def _base_values(path_arg: str | None) -> tuple[dict[str, Any], str]:
    path = Path(path_arg) if path_arg else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    if path is None:
        return {"resolution": "512,512"}, "kohya defaults at 512x512"
    return flatten_sections(read_toml(path, "training config"), str(path)), str(path)


def _epoch_choices(path_arg: str | None) -> list[int]:
    from optuna.distributions import CategoricalDistribution

    from search.space import load_search_space

    path = Path(path_arg) if path_arg else (DEFAULT_SPACE if DEFAULT_SPACE.is_file() else None)
    if path is None:
        return list(DEFAULT_EPOCH_CHOICES)
    space = load_search_space(path)
    dist = space.distributions.get("max_train_epochs")
    if isinstance(dist, CategoricalDistribution):
        return [int(c) for c in dist.choices]
    fixed = space.fixed.get("max_train_epochs")
    return [int(fixed)] if fixed else list(DEFAULT_EPOCH_CHOICES)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="warning: %(message)s")
    values, source = _base_values(args.config)
    if args.preset:
        values = apply_preset(values, args.preset)
        source += f" + preset {args.preset}"
    values["train_data_dir"] = str(args.data_dir)
    cfg = config_from_dict(values, source)
    report = dataset_report(cfg)
    if args.auto_steps:
        values = apply_auto_steps(values, report.images)
        cfg = config_from_dict(values, source + " + auto-steps")
    print(f"config: {source}")
    print("\n".join(format_dataset_report(report)))
    _print_budgets(args, report, cfg)
    if args.auto_steps:
        _print_auto_steps(report)
    from search.preflight import describe_model

    print(describe_model(cfg.pretrained_model_name_or_path))
    print(vram_line(cfg, args.arch))
    parts = estimate_vram(cfg, args.arch).parts
    print("  " + ", ".join(f"{name} {gib:.2f}" for name, gib in parts.items() if gib > 0) + " GiB")
    if args.out:
        write_config(args.out, values, header=f"# written by lora-search plan from {source}")
        print(f"wrote {args.out}; check it with: lora-search check {args.out}")
    return 0


def _print_budgets(args: argparse.Namespace, report, cfg) -> None:
    low, high = STEPS_PER_IMAGE_RANGE
    print(f"step budget (batch {cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps}; "
          f"steps per image = steps / (images x repeats), {low:g}-{high:g} recommended):")
    print(f"  {'epochs':>5} {'steps':>8} {'steps/img':>10} {'views/img':>10}")
    own = config_budget(report, cfg)
    rows = epoch_budgets(report, cfg, _epoch_choices(args.search_space))
    for budget in rows:
        print(format_budget(budget, "  <- this config" if budget.epochs == own.epochs else ""))
    if cfg.max_train_epochs is None:
        print(format_budget(own, f"  <- this config (max_train_steps = {own.steps})"))
    warning = budget_warning(own, report, cfg)
    if warning:
        print(f"warning: {warning}")


def _print_auto_steps(report) -> None:
    rule = auto_steps(report.images)
    note = " (clamped)" if rule.clamped else ""
    print(f"auto-steps: {report.images} images x 40 = max_train_steps {rule.max_train_steps}{note}, "
          f"save_every_n_steps {rule.save_every_n_steps}; max_train_epochs and per-epoch saving removed")
    if any(f.repeats != 1 for f in report.folders):
        print("note: the rule assumes repeats 1; rename the folders to 1_<name> for 40 steps per image")
