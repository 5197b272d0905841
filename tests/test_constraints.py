"""Each of the seven safety constraints at and around its thresholds, plus the sampling check."""

from __future__ import annotations

import optuna
import pytest

from search.constraints import CONSTRAINTS, violations
from search.space import apply_params, load_search_space
from search.trial_config import load_base_values
from study_fixtures import REPO
from training.config import config_from_dict

SAFE = dict(network_dim=64, network_alpha=32, learning_rate=8e-5, optimizer_type="AdamW8bit", lr_scheduler="cosine",
            max_train_epochs=20, gradient_accumulation_steps=2, lr_warmup_steps=100)


def fired(**changes) -> list[int]:
    return [c.id for c in violations(config_from_dict({**SAFE, **changes}))]


def test_the_safe_baseline_and_the_base_config_pass():
    assert fired() == []
    assert violations(config_from_dict(load_base_values(REPO / "configs" / "base.toml"))) == []


def test_table_has_seven_constraints_with_reasons():
    assert [c.id for c in CONSTRAINTS] == [1, 2, 3, 4, 5, 6, 7]
    assert all(c.reason and c.rule for c in CONSTRAINTS)


@pytest.mark.parametrize("lr,optimizer,expected", [
    (1.2e-4, "AdamW8bit", False), (1.2001e-4, "AdamW8bit", True), (1.3e-4, "AdamW", False),
])
def test_1_high_lr_with_8bit(lr, optimizer, expected):
    # warmup 150 and accum 2 keep constraints 4 and 5 out of the way
    assert (1 in fired(learning_rate=lr, optimizer_type=optimizer, lr_warmup_steps=150)) is expected


@pytest.mark.parametrize("alpha,expected", [(64, True), (63.5, True), (63, False), (64.9, True), (65, False)])
def test_2_alpha_equal_to_dim(alpha, expected):
    assert (2 in fired(network_alpha=alpha)) is expected


@pytest.mark.parametrize("dim,epochs,expected", [(256, 15, True), (256, 16, False), (128, 12, False), (512, 12, True)])
def test_3_high_dim_few_epochs(dim, epochs, expected):
    assert (3 in fired(network_dim=dim, network_alpha=dim // 2, max_train_epochs=epochs)) is expected


def test_3_steps_based_config_cannot_prove_epochs():
    values = {k: v for k, v in SAFE.items() if k != "max_train_epochs"}
    assert [c.id for c in violations(config_from_dict({**values, "network_dim": 256, "network_alpha": 128}))] == [3]


@pytest.mark.parametrize("lr,warmup,expected", [(1e-4, 50, False), (1.0001e-4, 99, True), (1.0001e-4, 100, False)])
def test_4_high_lr_short_warmup(lr, warmup, expected):
    assert (4 in fired(learning_rate=lr, lr_warmup_steps=warmup)) is expected


@pytest.mark.parametrize("accum,lr,expected", [(1, 1.1e-4, False), (1, 1.1001e-4, True), (2, 1.15e-4, False)])
def test_5_no_accumulation_high_lr(accum, lr, expected):
    assert (5 in fired(gradient_accumulation_steps=accum, learning_rate=lr)) is expected


STABLE = dict(max_train_epochs=16, gradient_accumulation_steps=2, optimizer_type="AdamW", lr_warmup_steps=150)


@pytest.mark.parametrize("alpha,expected", [(47, False), (48, True), (54, True)])
def test_6_high_ratio_needs_stable_setup(alpha, expected):
    assert (6 in fired(network_alpha=alpha)) is expected  # 8-bit baseline: not stable


@pytest.mark.parametrize("change", [
    {}, {"max_train_epochs": 15}, {"gradient_accumulation_steps": 1}, {"optimizer_type": "AdamW8bit"},
    {"lr_warmup_steps": 149},
])
def test_6_every_stability_condition_is_required(change):
    assert (6 in fired(network_alpha=48, **{**STABLE, **change})) is bool(change)


def test_6_uses_the_truncated_ratio_from_the_config():
    # the study writes int(64 * 0.75) = 48 -> ratio 0.75 exactly; 47 would be 0.734
    assert 6 in fired(network_alpha=48) and 6 not in fired(network_alpha=47)


@pytest.mark.parametrize("alpha,lr,expected", [
    (54, 1.05e-4, False),  # ratio 0.85 at dim 64 truncates to 54 (0.844): not >= 0.85
    (55, 1.05e-4, True), (57, 1e-4, False), (57, 1.0001e-4, True),
])
def test_7_very_high_ratio_high_lr(alpha, lr, expected):
    assert (7 in fired(network_alpha=alpha, learning_rate=lr, lr_warmup_steps=150, **{
        k: v for k, v in STABLE.items() if k != "lr_warmup_steps"})) is expected


def test_unet_lr_is_the_lr_the_constraints_see():
    # sd-scripts trains the UNet with unet_lr when it is set; learning_rate is then only a default
    assert 4 in fired(learning_rate=5e-5, unet_lr=1.05e-4, lr_warmup_steps=50)
    assert 4 not in fired(learning_rate=1.05e-4, unet_lr=9e-5, lr_warmup_steps=50)


def test_uniform_draws_on_the_default_space_are_rejected_at_the_documented_rates():
    space = load_search_space(REPO / "configs" / "search_space.toml")
    base = load_base_values(REPO / "configs" / "base.toml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    n, rejected, by = 3000, 0, {6: 0, 7: 0, 1: 0, 2: 0}
    for _ in range(n):
        trial = study.ask()
        ids = [c.id for c in violations(config_from_dict(apply_params(base, space.suggest(trial))))]
        rejected += bool(ids)
        for cid in by:
            by[cid] += cid in ids
        study.tell(trial, 0.0)
    assert rejected / n == pytest.approx(0.375, abs=0.03)
    assert by[6] / n == pytest.approx(0.25, abs=0.025)
    assert 0.005 < by[7] / n < 0.02
    assert by[1] == by[2] == 0  # cannot fire on the default space
