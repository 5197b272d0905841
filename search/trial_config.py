"""Per-trial training configs: the base config plus a trial's params, as a complete kohya TOML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.space import apply_params
from training.config import TrainingConfig, config_from_dict, write_config
from training.presets import load_config_values

# Keys holding paths that a trial folder's config must still find from anywhere.
PATH_KEYS = ("pretrained_model_name_or_path", "vae", "train_data_dir", "sample_prompts", "network_weights")


def load_base_values(path: str | Path, preset: str = "") -> dict[str, Any]:
    """The base training config (with the study's preset, if any) as flat kohya keys, validated."""
    return load_config_values(path, preset or None)


def absolute_paths(values: dict[str, Any]) -> dict[str, Any]:
    """Relative paths that exist from the current directory made absolute (sd-scripts reads paths
    relative to where it runs; a trial's config must work from its own folder too)."""
    out = dict(values)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and Path(value).exists():
            out[key] = str(Path(value).resolve())
    return out


def trial_values(base: dict[str, Any], params: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The complete config a trial trains with: base + params, its own output folder, absolute paths."""
    values = absolute_paths(apply_params(base, params))
    values["output_dir"] = str(run_dir.resolve())
    values["logging_dir"] = str((run_dir / "logs").resolve())
    return values


def write_trial_config(path: Path, values: dict[str, Any], header: str) -> TrainingConfig:
    """Validate and atomically write a trial's config.toml; returns the typed config."""
    cfg = config_from_dict(values, str(path))
    write_config(path, values, header)
    return cfg
