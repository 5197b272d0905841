"""Every per-trial config of the default space is one sd-scripts' train_network.py accepts.

sd-scripts is not installed here, so its rules are written down as facts, read from kohya-ss/sd-scripts
``library/train_util.py``: ``get_scheduler_fix`` builds diffusers' ``SchedulerType(name)`` (anything
else raises), raises ``ValueError("... does not require num_warmup_steps. Set None or 0.")`` for
``constant`` with a warmup, and needs a warmup value for every other schedule; ``get_optimizer``
matches ``optimizer_type`` case-insensitively and splits each ``optimizer_args`` entry on "=" and reads
the value with ``ast.literal_eval``; ``--config_file`` keys are the argument names of
``train_network.py`` (training/kohya_args.txt).
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys

import pytest

from search.space import apply_params, load_search_space
from helpers import lr_curve
from search.trial_config import load_base_values
from study_fixtures import REPO
from training.config import ConfigError, config_from_dict, kohya_argument_names, load_training_config, write_config

SD_SCRIPTS_SCHEDULERS = {"linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                         "constant_with_warmup", "piecewise_constant"}
SD_SCRIPTS_OPTIMIZERS = {"adamw", "adamw8bit", "lion", "lion8bit", "sgdnesterov", "sgdnesterov8bit", "prodigy",
                         "adafactor", "pagedadamw8bit", "pagedlion8bit", "dadaptation", "dadaptadam"}

SPACE = load_search_space(REPO / "configs" / "search_space.toml")
BASE = load_base_values(REPO / "configs" / "base.toml")
SAFE_POINT = {"network_dim": 128, "network_alpha_ratio": 0.5, "network_dropout": 0.1, "learning_rate": 8e-5,
              "text_encoder_lr": 4e-5, "max_train_epochs": 20, "min_snr_gamma": 5, "gradient_accumulation_steps": 2}


def sd_scripts_refusal(values: dict) -> str | None:
    """What sd-scripts would raise for these config values (None: it accepts them)."""
    unknown = set(values) - kohya_argument_names()
    if unknown:
        return f"unrecognized arguments {sorted(unknown)}"
    if values.get("lr_scheduler", "constant") not in SD_SCRIPTS_SCHEDULERS:
        return f"{values['lr_scheduler']!r} is not a valid SchedulerType"
    if values.get("lr_scheduler", "constant") == "constant" and values.get("lr_warmup_steps", 0):
        return "SchedulerType.CONSTANT does not require num_warmup_steps. Set None or 0."
    if values.get("optimizer_type", "AdamW").lower() not in SD_SCRIPTS_OPTIMIZERS:
        return f"unknown optimizer {values['optimizer_type']!r}"
    for arg in values.get("optimizer_args", []):
        key, value = arg.split("=")  # sd-scripts unpacks exactly two parts
        ast.literal_eval(value)
    return None


SCHEDULERS = SPACE.distributions["lr_scheduler"].choices
OPTIMIZERS = SPACE.distributions["optimizer_type"].choices
WARMUPS = SPACE.distributions["lr_warmup_steps"].choices


@pytest.mark.parametrize("scheduler,optimizer", list(itertools.product(SCHEDULERS, OPTIMIZERS)))
def test_every_scheduler_and_optimizer_of_the_default_space_is_accepted_and_warms_up(scheduler, optimizer):
    for warmup in WARMUPS:
        params = {**SAFE_POINT, "lr_scheduler": scheduler, "optimizer_type": optimizer, "lr_warmup_steps": warmup}
        values = apply_params(BASE, params)
        assert sd_scripts_refusal(values) is None
        cfg = config_from_dict(values)
        lrs = lr_curve(cfg, 400)
        # the warmup the constraints count is the warmup the built-in trainer runs
        assert lrs[0] == 0.0 and lrs[warmup // 2] == pytest.approx(cfg.learning_rate / 2, rel=0.05)
        assert max(lrs) == pytest.approx(cfg.learning_rate)


def test_a_user_space_sampling_plain_constant_writes_constant_with_warmup():
    values = apply_params(BASE, {"lr_scheduler": "constant", "lr_warmup_steps": 100})
    assert values["lr_scheduler"] == "constant_with_warmup" and sd_scripts_refusal(values) is None
    assert apply_params(BASE, {"lr_scheduler": "constant", "lr_warmup_steps": 0})["lr_scheduler"] == "constant"


def test_the_refusal_rules_can_fail():
    assert "CONSTANT" in sd_scripts_refusal({"lr_scheduler": "constant", "lr_warmup_steps": 50})
    assert "not a valid" in sd_scripts_refusal({"lr_scheduler": "cosine_annealing"})
    assert "unrecognized" in sd_scripts_refusal({"network_alpha_ratio": 0.5})


def test_constant_with_warmup_is_refused_by_the_config_like_sd_scripts_does():
    with pytest.raises(ConfigError, match='lr_warmup_steps = 100 sd-scripts refuses it; use lr_scheduler = "constant_with_warmup"'):
        config_from_dict({"lr_scheduler": "constant", "lr_warmup_steps": 100})


def test_check_names_the_fix_for_constant_with_warmup(tmp_path):
    text = (REPO / "configs" / "base.toml").read_text().replace('"cosine_with_restarts"', '"constant"')
    path = tmp_path / "c.toml"
    path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "search", "check", str(path)], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 2
    assert "constant_with_warmup" in done.stderr + done.stdout


def sd_scripts_reads(path) -> dict:
    """The flat arguments sd-scripts' ``read_config_from_file`` takes from a config: ``toml.load``, then
    every section's keys merged into one namespace."""
    toml = pytest.importorskip("toml")  # the parser sd-scripts uses (a dev dependency here)
    with open(path, encoding="utf-8") as f:
        loaded = toml.load(f)
    flat = {}
    for name, section in loaded.items():
        flat.update(section if isinstance(section, dict) else {name: section})
    return flat


def test_written_configs_mean_the_same_to_sd_scripts_and_round_trip(tmp_path):
    awkward = {"output_dir": "C:\\Users\\ana\\loras\\trial \"7\"", "output_name": "zoë-ß_v2",
               "train_data_dir": str(tmp_path / "data set" / "10_ohwx"), "learning_rate": 7.5e-05,
               "unet_lr": 1e-4, "text_encoder_lr": 3.3e-05, "noise_offset": 0.0357, "network_alpha": 54.0,
               "optimizer_args": ["weight_decay=0.01", "betas=(0.9,0.99)", "eps=1e-08"] * 4,
               "network_args": [], "shuffle_caption": True, "flip_aug": False,
               "sample_prompts": "prompts/validation.txt", "seed": 2**40}
    values = apply_params({**BASE, **awkward}, SAFE_POINT)
    path = write_config(tmp_path / "trial_0007" / "config.toml", values, header="# trial 7")
    assert sd_scripts_reads(path) == values
    assert load_training_config(path).to_dict() == config_from_dict(values).to_dict()
