"""Presets: small TOML overlays of kohya keys in ``configs/presets/`` (character, style, concept).

A preset sets only the keys that differ by what is being trained; everything else comes from the base
config it is applied to. ``train``, ``plan`` and the study's base config use :func:`apply_preset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.config import config_from_dict, flatten_sections, read_toml
from training.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"


def available_presets(preset_dir: Path = PRESET_DIR) -> list[str]:
    """Names of the shipped presets (file stems), sorted."""
    return sorted(p.stem for p in preset_dir.glob("*.toml"))


def preset_path(name: str, preset_dir: Path = PRESET_DIR) -> Path:
    """The file of preset ``name``; a path to a ``.toml`` file is accepted as a user preset."""
    if name.endswith(".toml"):
        if not Path(name).is_file():
            raise ConfigError(f"preset file {name} not found; check the path")
        return Path(name)
    path = preset_dir / f"{name}.toml"
    if not path.is_file():
        names = ", ".join(available_presets(preset_dir)) or f"none found in {preset_dir}"
        raise ConfigError(f"unknown preset '{name}'; available presets: {names}")
    return path


def load_preset(name: str, preset_dir: Path = PRESET_DIR) -> dict[str, Any]:
    """The preset's flat kohya keys, checked against the training config schema."""
    path = preset_path(name, preset_dir)
    values = flatten_sections(read_toml(path, "preset"), str(path))
    config_from_dict(values, f"preset {path}")  # unknown keys and bad values name the preset file
    return values


def apply_preset(values: dict[str, Any], name: str, preset_dir: Path = PRESET_DIR) -> dict[str, Any]:
    """Flat config ``values`` with preset ``name`` laid over them (a new dict; the preset wins)."""
    return {**values, **load_preset(name, preset_dir)}


def load_config_values(path: str | Path, preset: str | None = None) -> dict[str, Any]:
    """A training config file as flat kohya keys, with ``preset`` laid over it, validated."""
    values = flatten_sections(read_toml(path, "training config"), str(path))
    if preset:
        values = apply_preset(values, preset)
    config_from_dict(values, str(path) + (f" with preset {preset}" if preset else ""))
    return values
