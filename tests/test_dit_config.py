"""sd-scripts' SD3 keys in the strict training config, and which keys each model family and trainer accept.

The SD3 config below is what a user of ``sd3_train_network.py`` writes for SD3.5 Large on a 16 GB card
(sd-scripts README: fp8 base, cached text-encoder outputs, gradient checkpointing, AdamW8bit, dim 4,
bf16, ``networks.lora_sd3``), plus the flow-matching options of ``add_dit_training_arguments`` and
``add_sd3_training_arguments`` (library/train_util.py, library/sd3_train_utils.py).
"""

import pytest

from training.config import (ConfigError, config_from_dict, dumps_config, kohya_argument_names,
                             kohya_sd3_argument_names, load_training_config)
from training.dit import SD3Family, ZImageFamily
from training.families import check_family_config
from training.flow import FlowSettings

SD3_KOHYA = {
    "pretrained_model_name_or_path": "/models/sd3.5_large.safetensors", "clip_l": "/models/clip_l.safetensors",
    "clip_g": "/models/clip_g.safetensors", "t5xxl": "/models/t5xxl_fp16.safetensors",
    "network_module": "networks.lora_sd3", "network_dim": 4, "network_alpha": 4.0, "network_train_unet_only": True,
    "optimizer_type": "AdamW8bit", "learning_rate": 1e-4, "mixed_precision": "bf16", "gradient_checkpointing": True,
    "fp8_base": True, "cache_text_encoder_outputs": True, "cache_text_encoder_outputs_to_disk": True,
    "cache_latents_to_disk": True, "weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
    "mode_scale": 1.29, "training_shift": 3.0, "t5xxl_max_token_length": 154, "apply_t5_attn_mask": True,
    "apply_lg_attn_mask": True, "clip_l_dropout_rate": 0.1, "clip_g_dropout_rate": 0.1, "t5_dropout_rate": 0.1,
    "blocks_to_swap": 8, "text_encoder_batch_size": 4, "disable_mmap_load_safetensors": True,
    "pos_emb_random_crop_rate": 0.2, "enable_scaled_pos_embed": True, "fp8_base_unet": True,
}


def test_an_sd3_train_network_config_loads_and_round_trips_with_only_sd_scripts_names(tmp_path):
    path = tmp_path / "sd3.toml"
    path.write_text(dumps_config(SD3_KOHYA))
    cfg = load_training_config(path)
    assert {key: getattr(cfg, key) for key in SD3_KOHYA} == SD3_KOHYA
    again = tmp_path / "again.toml"
    again.write_text(dumps_config(cfg.to_dict()))
    assert load_training_config(again) == cfg
    assert set(SD3_KOHYA) <= kohya_argument_names() | kohya_sd3_argument_names()
    assert not set(SD3_KOHYA) & kohya_sd3_argument_names() <= kohya_argument_names()  # sd3-only names exist
    assert FlowSettings.from_config(cfg) == FlowSettings("logit_normal", 0.0, 1.0, 1.29, 3.0)


def test_sd3_defaults_are_sd_scripts_defaults():
    cfg = config_from_dict({})
    assert (cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, cfg.training_shift) == \
        ("uniform", 0.0, 1.0, 1.29, 1.0)
    assert cfg.t5xxl_max_token_length == 256 and cfg.blocks_to_swap is None and not cfg.fp8_base
    # a trial config for train_network.py gets no key only sd3_train_network.py knows
    assert not set(cfg.to_dict()) & kohya_sd3_argument_names()


@pytest.mark.parametrize("values,message", [
    ({"weighting_scheme": "lognormal"}, "weighting_scheme = 'lognormal': use one of uniform, none, logit_normal"),
    ({"training_shift": 0}, "training_shift = 0.0: must be a number > 0"),
    ({"network_module": "networks.lora_flux"}, "use networks.lora or networks.lora_sd3"),
    ({"t5_dropout_rate": 1.5}, "t5_dropout_rate = 1.5: must be in [0, 1)"),
    ({"blocks_to_swap": -1}, "blocks_to_swap = -1: must not be negative"),
    ({"save_t5xxl": True}, "'save_t5xxl' is an sd-scripts option lora-search does not support"),
    ({"weighting_schme": "mode"}, "did you mean 'weighting_scheme'?"),
])
def test_bad_sd3_values_are_refused_naming_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(values)
    assert message in str(err.value)


def test_each_family_and_trainer_refuses_keys_it_would_ignore():
    cfg = config_from_dict(SD3_KOHYA)
    check_family_config(cfg, "sd3", builtin=False)  # what the kohya backend passes to sd3_train_network.py
    with pytest.raises(ConfigError, match="clip_l is read by sd-scripts' sd3_train_network.py only"):
        check_family_config(cfg, "sd3", builtin=True)
    with pytest.raises(ConfigError, match="Z-Image is not in sd-scripts"):
        check_family_config(cfg, "zimage", builtin=False)
    with pytest.raises(ConfigError, match="weighting_scheme applies to SD3/Z-Image models only"):
        check_family_config(cfg, "sdxl")
    with pytest.raises(ConfigError, match="t5xxl_max_token_length applies to SD3 models only"):
        check_family_config(config_from_dict({"t5xxl_max_token_length": 77}), "zimage")
    check_family_config(config_from_dict({"t5xxl_max_token_length": 77}), "sd3")  # the built-in trainer reads it
    flow_only = config_from_dict({"weighting_scheme": "logit_normal", "training_shift": 3.0, "fp8_base": True})
    check_family_config(flow_only, "zimage")
    check_family_config(flow_only, "sd3")
    with pytest.raises(ConfigError, match="needs \"networks.lora_sd3\""):
        check_family_config(flow_only, "sd3", builtin=False)
    with pytest.raises(ConfigError, match="is for SD3 models"):
        check_family_config(config_from_dict({"network_module": "networks.lora_sd3"}), "sd1")
    check_family_config(config_from_dict({"network_dim": 8}), "sd1")
    with pytest.raises(ConfigError, match="fp8_base: the built-in trainer keeps SDXL weights"):
        check_family_config(config_from_dict({"fp8_base": True}), "sdxl")
    check_family_config(config_from_dict({"fp8_base": True}), "sdxl", builtin=False)


def test_a_family_set_up_from_a_config_uses_its_timestep_sampling_and_t5_length():
    cfg = config_from_dict({"weighting_scheme": "mode", "mode_scale": 0.8, "training_shift": 2.0,
                            "t5xxl_max_token_length": 77})
    sd3 = SD3Family().for_config(cfg)
    assert sd3.flow == FlowSettings("mode", 0.0, 1.0, 0.8, 2.0) and sd3.t5_max_length == 77
    assert ZImageFamily().for_config(cfg).flow == sd3.flow
