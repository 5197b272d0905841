"""The strict kohya training config and every file shipped in configs/."""

from __future__ import annotations

import pytest

from search.settings import load_settings
from search.space import load_search_space
from search.trial_config import trial_values
from study_fixtures import REPO
from training.config import (FIELDS, LORA_SEARCH_KEYS, config_from_dict, dumps_config, kohya_argument_names, kohya_sd3_argument_names,
                             load_training_config, write_config)
from training.errors import ConfigError


def test_every_config_field_is_a_train_network_argument():
    assert set(FIELDS) - LORA_SEARCH_KEYS <= kohya_argument_names() | kohya_sd3_argument_names()
    assert not LORA_SEARCH_KEYS & (kohya_argument_names() | kohya_sd3_argument_names())
    assert {"network_dim", "unet_lr", "min_snr_gamma", "sdpa"} <= kohya_argument_names()


def test_base_config_has_the_proven_values_and_only_kohya_keys():
    cfg = load_training_config(REPO / "configs" / "base.toml")
    assert (cfg.network_dim, cfg.network_alpha, cfg.network_dropout) == (64, 32, 0.1)
    assert (cfg.learning_rate, cfg.unet_lr, cfg.text_encoder_lr) == (8e-5, 8e-5, 4e-5)
    assert (cfg.lr_scheduler, cfg.lr_scheduler_num_cycles, cfg.lr_warmup_steps) == ("cosine_with_restarts", 2, 100)
    assert cfg.optimizer_type == "AdamW8bit" and cfg.optimizer_args == ["weight_decay=0.01"]
    assert (cfg.max_train_epochs, cfg.train_batch_size, cfg.gradient_accumulation_steps) == (20, 4, 2)
    assert (cfg.min_snr_gamma, cfg.noise_offset) == (5.0, 0.05)
    assert not cfg.color_aug and not cfg.flip_aug and cfg.sdpa and not cfg.xformers
    assert (cfg.save_every_n_epochs, cfg.sample_every_n_epochs, cfg.resolution) == (2, 2, "512,512")


def test_shipped_study_and_space_configs_load():
    settings = load_settings(REPO / "configs" / "study.toml")
    assert settings.sampler.n_startup_trials == 5 and settings.sampler.multivariate and settings.sampler.group
    load_search_space(REPO / "configs" / "search_space.toml")


def test_trial_toml_round_trip_writes_only_sd_scripts_names(tmp_path):
    base = load_training_config(REPO / "configs" / "base.toml").to_dict()
    params = {"network_dim": 128, "network_alpha_ratio": 0.5, "learning_rate": 7e-5, "min_snr_gamma": 0}
    values = trial_values(base, params, tmp_path / "trial_0000")
    path = write_config(tmp_path / "trial_0000" / "config.toml", values)
    import tomllib

    written = tomllib.loads(path.read_text())
    keys = [k for section in written.values() for k in section]
    assert set(keys) <= kohya_argument_names()
    assert len(keys) == len(set(keys))
    again = load_training_config(path)
    assert again.to_dict() == config_from_dict(values).to_dict()
    assert again.network_alpha == 64 and again.unet_lr == 7e-5 and again.min_snr_gamma == 0.0


@pytest.mark.parametrize("text,message", [
    ("network_dimm = 4", "unknown key 'network_dimm'; did you mean 'network_dim'?"),
    ("[training]\nlowram = true", "'lowram' is an sd-scripts option lora-search does not support"),
    ("xformers = true", "xformers is not used; attention runs on PyTorch SDPA"),
    ("network_dim = 'big'", "network_dim = 'big': write a whole number"),
    ("network_dim = 0", "network_dim = 0: must be at least 1"),
    ("optimizer_type = 'Adam9'", "optimizer_type = 'Adam9': use one of"),
    ("[a]\nseed = 1\n[b]\nseed = 2", "'seed' is set twice"),
    ("resolution = '512x512'", "resolution = '512x512'"),
    ("network_dropout = 1.0", "must be in [0, 1)"),
    ("flip_aug = 1", "flip_aug = 1: write true or false"),
])
def test_bad_training_configs_give_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_training_config(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_optimizer_names_are_case_insensitive_like_sd_scripts():
    assert config_from_dict({"optimizer_type": "adamw8bit"}).optimizer_type == "AdamW8bit"


def test_dumps_groups_keys_in_sections():
    text = dumps_config({"network_dim": 8, "learning_rate": 1e-4, "train_data_dir": "d"})
    assert "[network]\nnetwork_dim = 8" in text and "[optimizer]" in text and "[dataset]" in text
