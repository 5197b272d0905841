"""The shipped SD 3.5 / Z-Image configs: configs/dit/base.toml, configs/dit/search_space.toml and the turbo
and deturbo presets load strictly, suit both DiT families for the built-in trainer and pass the seven
safety constraints; the turbo preset is refused on an SD 1.x/SDXL config."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from optuna.distributions import CategoricalDistribution

from search.constraints import CONSTRAINTS, violations
from search.space import ALPHA_RATIO, apply_params, load_search_space
from study_fixtures import REPO
from training.config import config_from_dict, load_training_config
from training.errors import ConfigError
from training.families import DIT_FAMILIES, UNET_ONLY_KEYS, check_family_config
from training.presets import load_config_values, load_preset

DIT_BASE = REPO / "configs" / "dit" / "base.toml"
DIT_SPACE = REPO / "configs" / "dit" / "search_space.toml"
SD15_BASE = REPO / "configs" / "base.toml"
DIT_PRESETS = ("turbo", "deturbo")
SD_ONLY = set(UNET_ONLY_KEYS) | {"text_encoder_lr", "network_train_text_encoder_only"}
# A point of the DiT space that every constraint lets through (ratio 0.5, lr 8e-5, accumulation 2).
SAFE_POINT = {"network_dim": 32, ALPHA_RATIO: 0.5, "network_dropout": 0.0, "learning_rate": 8e-5,
              "lr_scheduler": "cosine", "lr_warmup_steps": 100, "max_train_epochs": 16, "optimizer_type": "AdamW8bit",
              "gradient_accumulation_steps": 2, "weighting_scheme": "logit_normal", "training_shift": 3.0}


def suits_both_dit_families(cfg) -> None:
    for family in DIT_FAMILIES:
        check_family_config(cfg, family, builtin=True)


def test_dit_base_loads_strictly_and_suits_both_dit_families():
    cfg = load_training_config(DIT_BASE)
    suits_both_dit_families(cfg)
    assert violations(cfg) == []
    assert not SD_ONLY & set(cfg.to_dict(include_defaults=False))
    # the user's SD 3.5 Large Turbo run: rank 32, alpha 64, lr 1e-4, batch 1
    assert (cfg.network_dim, cfg.network_alpha, cfg.learning_rate, cfg.train_batch_size) == (32, 64, 1e-4, 1)
    assert cfg.fp8_base and cfg.network_train_unet_only and cfg.gradient_checkpointing and cfg.cache_latents
    assert (cfg.mixed_precision, cfg.weighting_scheme) == ("bf16", "logit_normal")
    assert not cfg.turbo and cfg.training_adapter is None  # left to the presets and the user


def test_dit_base_is_refused_for_a_unet_family():
    cfg = load_training_config(DIT_BASE)
    for family in ("sd1", "sdxl"):
        with pytest.raises(ConfigError, match="applies to SD3/Z-Image models only"):
            check_family_config(cfg, family, builtin=True)


@pytest.mark.parametrize("preset", DIT_PRESETS)
def test_dit_preset_on_dit_base_suits_both_families_and_is_safe(preset):
    cfg = config_from_dict(load_config_values(DIT_BASE, preset), preset)
    suits_both_dit_families(cfg)
    assert violations(cfg) == []
    for key, value in load_preset(preset).items():
        assert getattr(cfg, key) == value  # the preset wins over the base


def test_turbo_and_deturbo_differ_where_the_models_differ():
    turbo, deturbo = load_preset("turbo"), load_preset("deturbo")
    assert turbo["turbo"] is True and deturbo["turbo"] is False
    assert deturbo["max_train_epochs"] > turbo["max_train_epochs"]  # De-Turbo is for the longer runs
    assert "training_adapter" not in turbo  # it is refused on SD3, and the preset serves SD 3.5 Large Turbo too


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_turbo_preset_on_the_sd15_base_is_refused_for_a_unet_family(family):
    cfg = config_from_dict(load_config_values(SD15_BASE, "turbo"), "turbo")  # a valid config ...
    with pytest.raises(ConfigError, match="^turbo applies to SD3/Z-Image models only; remove it"):
        check_family_config(cfg, family, builtin=True)  # ... that no UNet model trains with


def test_deturbo_preset_on_the_sd15_base_only_sets_lr_and_epochs():
    base = config_from_dict(load_config_values(SD15_BASE)).to_dict()
    cfg = config_from_dict(load_config_values(SD15_BASE, "deturbo"), "deturbo")
    check_family_config(cfg, "sd1", builtin=True)  # documented in the preset: not refused
    changed = {key for key, value in cfg.to_dict().items() if value != base.get(key)}
    assert changed == {"learning_rate", "unet_lr", "max_train_epochs"}


@pytest.mark.parametrize("preset", ["character", "style", "concept"])
def test_sd15_presets_on_the_dit_base_are_refused_in_one_line(preset):
    cfg = config_from_dict(load_config_values(DIT_BASE, preset), preset)
    for family in DIT_FAMILIES:
        with pytest.raises(ConfigError, match=r"^(min_snr_gamma|text_encoder_lr)\b.*remove it"):
            check_family_config(cfg, family, builtin=True)


def test_dit_space_loads_strictly_with_only_keys_a_dit_uses():
    space = load_search_space(DIT_SPACE)
    names = set(space.distributions) | set(space.fixed)
    assert not names & SD_ONLY
    assert {"network_dim", ALPHA_RATIO, "learning_rate", "weighting_scheme", "training_shift"} <= names
    assert set(SAFE_POINT) == names  # the safe point below covers the whole space


def test_safe_point_of_the_dit_space_passes_everything():
    base = load_config_values(DIT_BASE)
    for preset in (None, *DIT_PRESETS):
        values = load_config_values(DIT_BASE, preset) if preset else base
        cfg = config_from_dict(apply_params(values, SAFE_POINT))
        suits_both_dit_families(cfg)
        assert violations(cfg) == [], preset


def space_values(dist) -> list:
    """Every categorical choice, or both ends of a range."""
    return list(dist.choices) if isinstance(dist, CategoricalDistribution) else [dist.low, dist.high]


def test_every_combination_of_the_dit_space_suits_both_families_and_no_value_is_always_rejected():
    space = load_search_space(DIT_SPACE)
    base = load_config_values(DIT_BASE)
    names = list(space.distributions)
    grids = [space_values(space.distributions[name]) for name in names]
    safe_values: dict[str, set] = {name: set() for name in names}
    fired: set[int] = set()
    total = rejected = 0
    for combo in itertools.product(*grids):
        point = dict(zip(names, combo))
        cfg = config_from_dict(apply_params(base, point))
        suits_both_dit_families(cfg)
        broken = violations(cfg)
        total += 1
        if broken:
            rejected += 1
            fired.update(c.id for c in broken)
        else:
            for name, value in point.items():
                safe_values[name].add(value)
    for name, grid in zip(names, grids):
        assert safe_values[name] == set(grid), f"{name}: a value the constraints always reject"
    assert fired <= {c.id for c in CONSTRAINTS} and 0 < rejected < total


def test_most_uniform_draws_of_the_dit_space_train():
    """Rejected draws cost no GPU time but slow the search; the default space rejects about 37.5%."""
    space = load_search_space(DIT_SPACE)
    base = load_config_values(DIT_BASE)
    rng = random.Random(0)
    draws, rejected = 2000, 0
    for _ in range(draws):
        point = {}
        for name, dist in space.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                point[name] = rng.choice(dist.choices)
            elif dist.log:
                point[name] = math.exp(rng.uniform(math.log(dist.low), math.log(dist.high)))
            else:
                point[name] = dist.low + dist.step * rng.randint(0, round((dist.high - dist.low) / dist.step))
        rejected += bool(violations(config_from_dict(apply_params(base, point))))
    assert 0.2 < rejected / draws < 0.5


@pytest.mark.parametrize("point,fired", [
    (SAFE_POINT, []),
    ({**SAFE_POINT, "learning_rate": 1.5e-4, "optimizer_type": "AdamW8bit", "lr_warmup_steps": 50,
      "gradient_accumulation_steps": 1, ALPHA_RATIO: 0.9, "max_train_epochs": 12}, [1, 4, 5, 6, 7]),
])
def test_constraints_ignore_the_text_encoder_lr_a_dit_config_leaves_unset(point, fired):
    values = apply_params(load_config_values(DIT_BASE), point)
    dit = config_from_dict(values)
    assert dit.text_encoder_lr is None and dit.min_snr_gamma is None
    assert [c.id for c in violations(dit)] == fired
    with_te = config_from_dict({**values, "text_encoder_lr": 1e-3, "min_snr_gamma": 5.0})
    assert [c.id for c in violations(with_te)] == fired
