"""The search-efficiency benchmark: its landscape has the documented shape, and a search runs on the real Worker."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import loaded_benchmark
from training.config import config_from_dict

SAFE = {"network_dim": 128, "network_alpha": 64, "network_dropout": 0.1, "learning_rate": 8e-5, "unet_lr": 8e-5,
        "text_encoder_lr": 4.5e-5, "lr_scheduler": "cosine", "max_train_epochs": 20, "min_snr_gamma": 5,
        "optimizer_type": "AdamW", "gradient_accumulation_steps": 2, "lr_warmup_steps": 100, "train_batch_size": 4,
        "save_every_n_epochs": 2, "output_name": "lora"}


@pytest.fixture(scope="module")
def bench():
    yield from loaded_benchmark("search_efficiency.py")


def best(bench, **changes) -> float:
    return float(bench.curve(config_from_dict({**SAFE, **changes})).quality.max())


def best_lr(bench, **changes) -> float:
    grid = np.geomspace(3e-5, 3e-4, 25)
    return float(grid[np.argmax([best(bench, learning_rate=lr, unet_lr=lr, **changes) for lr in grid])])


def test_the_best_learning_rate_moves_with_alpha_over_dim_and_effective_batch(bench):
    assert best_lr(bench, network_alpha=32) > best_lr(bench, network_alpha=96)  # ratio 0.25 vs 0.75
    assert best_lr(bench, gradient_accumulation_steps=4) > best_lr(bench, gradient_accumulation_steps=1)


def test_quality_rises_then_overfits_and_a_constraint_region_explodes(bench):
    hot = bench.curve(config_from_dict({**SAFE, "learning_rate": 1.1e-4, "unet_lr": 1.1e-4, "network_alpha": 96,
                                        "lr_scheduler": "constant_with_warmup", "max_train_epochs": 24})).quality
    peak = int(np.argmax(hot))
    assert 0 < peak < len(hot) - 1 and hot[-1] < hot[peak]  # rise, then overfit
    wild = bench.curve(config_from_dict({**SAFE, "network_alpha": 115, "learning_rate": 1.2e-4, "unet_lr": 1.2e-4,
                                         "optimizer_type": "AdamW8bit", "gradient_accumulation_steps": 1,
                                         "lr_warmup_steps": 50})).quality
    assert wild[-1] == bench.EXPLODED  # constraints 1, 4-7 point here


def test_noise_is_the_same_for_the_same_config_and_epoch(bench):
    cfg = config_from_dict(SAFE)
    assert bench.noise(cfg, 4, 1) == bench.noise(cfg, 4, 1) != bench.noise(cfg, 6, 1)


def test_a_search_runs_on_the_real_worker_and_counts_its_cost(bench):
    out = bench.run_search(bench.Variant("t", "tpe", "schedule_median", n_trials=4), seed=3)
    assert out.trained == 4 and out.sampled == out.trained + out.rejected
    assert 0.2 <= out.true_pick <= 0.9
    assert out.gpu_hours >= 3 * 12 * 0.35  # no pruning before 3 trials finished: at least 3 whole schedules
