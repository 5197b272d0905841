"""Presets in configs/presets: valid kohya overlays with a rationale per key, safe on the base config."""

import re
from pathlib import Path

import pytest

from search.constraints import violations
from training.config import config_from_dict, flatten_sections, read_toml
from training.errors import ConfigError
from training.presets import PRESET_DIR, apply_preset, available_presets, load_preset

BASE = Path(__file__).resolve().parents[1] / "configs" / "base.toml"


def base_values() -> dict:
    return flatten_sections(read_toml(BASE), str(BASE))


def test_the_presets_ship():
    # deturbo and turbo are for SD 3.5 / Z-Image (tests/test_dit_configs.py)
    assert available_presets() == ["character", "concept", "deturbo", "style", "turbo"]


@pytest.mark.parametrize("name", ["character", "style", "concept"])
def test_preset_on_base_is_a_valid_safe_config(name):
    values = apply_preset(base_values(), name)
    cfg = config_from_dict(values, name)
    assert violations(cfg) == []  # `lora-search check` would call it safe
    for key, value in load_preset(name).items():
        assert getattr(cfg, key) == value  # the preset wins over the base


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_key_has_a_one_line_rationale(name):
    for line in (PRESET_DIR / f"{name}.toml").read_text(encoding="utf-8").splitlines():
        if re.match(r"^\s*\w+\s*=", line):
            assert re.search(r"#\s*\S.{8,}", line), f"{name}.toml: no rationale on: {line}"


def test_presets_differ_where_the_use_cases_differ():
    dims = {name: load_preset(name)["network_dim"] for name in ("character", "style", "concept")}
    assert dims["style"] < dims["concept"] < dims["character"]
    assert load_preset("character")["flip_aug"] is False and load_preset("style")["flip_aug"] is True


def test_apply_preset_leaves_the_input_alone():
    values = {"network_dim": 256, "seed": 7}
    out = apply_preset(values, "style")
    assert values == {"network_dim": 256, "seed": 7}
    assert out["network_dim"] == 16 and out["seed"] == 7


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError) as info:
        apply_preset({}, "portrait")
    assert str(info.value) == "unknown preset 'portrait'; available presets: character, concept, deturbo, style, turbo"


def test_user_preset_file_is_checked_strictly(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text("[network]\nnetwork_dim = 8 # small\n", encoding="utf-8")
    assert apply_preset({"seed": 1}, str(good)) == {"seed": 1, "network_dim": 8}
    bad = tmp_path / "bad.toml"
    bad.write_text("network_dimm = 8\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key 'network_dimm'; did you mean 'network_dim'"):
        apply_preset({}, str(bad))
    with pytest.raises(ConfigError, match="preset file .*nope.toml not found"):
        apply_preset({}, str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("command", ["train", "plan"])
def test_preset_help_lists_every_shipped_preset(command):
    import argparse

    from search.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    option = next(a for a in subparsers.choices[command]._actions if "--preset" in a.option_strings)
    for name in available_presets():
        assert re.search(rf"\b{name}\b", option.help), f"lora-search {command} --help does not offer {name}"
