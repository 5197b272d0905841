"""Loading configs/search_space.toml: the default space, edits users make, and bad files."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search.space import apply_params, load_search_space
from study_fixtures import REPO
from training.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def test_default_space_has_the_eleven_design_parameters():
    space = load_search_space(REPO / "configs" / "search_space.toml")
    d = space.distributions
    assert list(d) == ["network_dim", "network_alpha_ratio", "network_dropout", "learning_rate", "text_encoder_lr",
                       "lr_scheduler", "max_train_epochs", "min_snr_gamma", "optimizer_type",
                       "gradient_accumulation_steps", "lr_warmup_steps"]
    assert d["network_dim"] == CategoricalDistribution([64, 128, 256])
    assert d["network_alpha_ratio"] == FloatDistribution(0.25, 0.90, step=0.05)
    assert d["learning_rate"] == FloatDistribution(6e-5, 1.2e-4, log=True)
    assert d["text_encoder_lr"] == FloatDistribution(3e-5, 8e-5, log=True)
    assert d["optimizer_type"].choices == ("AdamW", "AdamW8bit")
    assert d["lr_warmup_steps"].choices == (50, 100, 150, 200)
    assert space.fixed == {}


def test_user_edits_ranges_steps_and_fixed_values(tmp_path):
    space = load_search_space(write(tmp_path, """
[network_dim]
value = 32
[lr_warmup_steps]
low = 0
high = 300
step = 50
[learning_rate]
low = 1e-5
high = 1e-4
"""))
    assert space.fixed == {"network_dim": 32}
    assert space.distributions["lr_warmup_steps"] == IntDistribution(0, 300, step=50)
    assert space.distributions["learning_rate"] == FloatDistribution(1e-5, 1e-4)
    trial = optuna.create_study().ask()
    values = space.suggest(trial)
    assert values["network_dim"] == 32 and "network_dim" not in trial.params
    assert values["lr_warmup_steps"] % 50 == 0


@pytest.mark.parametrize("text,message", [
    ("[network_dimm]\nchoices = [1]", "unknown parameter 'network_dimm'; did you mean 'network_dim'?"),
    ("[network_dim]\nchoice = [64]", "[network_dim] unknown key 'choice'; did you mean 'choices'?"),
    ("[network_dim]\nchoices = []", "[network_dim] choices must be a non-empty list"),
    ("[learning_rate]\nlow = 1e-4\nhigh = 1e-5", "[learning_rate] low 0.0001 is above high 1e-05"),
    ("[learning_rate]\nlow = 0\nhigh = 1e-4\nlog = true", "[learning_rate] log = true needs low > 0"),
    ("[learning_rate]\nlow = 'a'\nhigh = 1", "[learning_rate] needs numeric low and high"),
    ("[network_dim]\nchoices = [64]\nvalue = 64", "[network_dim] give exactly one of"),
    ("[optimizer_type]\nchoices = ['AdamW', 'Adam9']", "[optimizer_type] value 'Adam9' is not usable"),
    ("[network_alpha_ratio]\nlow = 0.5\nhigh = 1.5", "[network_alpha_ratio] must stay within (0, 1]"),
    ("network_dim = 64", "'network_dim' must be a table"),
    ("[network_alpha]\nvalue = 8\n[network_alpha_ratio]\nvalue = 0.5", "not both"),
    ("[network_dim\n", "is not valid TOML"),
])
def test_bad_space_files_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_search_space(write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_space_file(tmp_path):
    with pytest.raises(ConfigError, match="search space file .*nope.toml not found"):
        load_search_space(tmp_path / "nope.toml")


def test_apply_params_sets_alpha_from_ratio_and_unet_lr():
    values = apply_params({"network_dim": 8}, {"network_dim": 64, "network_alpha_ratio": 0.85, "learning_rate": 9e-5})
    assert values == {"network_dim": 64, "network_alpha": 54.0, "learning_rate": 9e-5, "unet_lr": 9e-5}
    assert apply_params({}, {"network_dim": 64, "network_alpha_ratio": 0.75})["network_alpha"] == 48.0
    # float error in the ratio must not drop a unit: 0.7499999999999999 * 64 = 47.99999...
    assert apply_params({}, {"network_dim": 64, "network_alpha_ratio": 0.7499999999999999})["network_alpha"] == 48.0
