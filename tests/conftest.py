"""Shared fixtures: tiny SD 1.x/SDXL model folders, a tiny CLIP, a tiny kohya dataset and configs over them."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can import tiny_models and friends

import tiny_clip  # noqa: E402
import tiny_models  # noqa: E402
from helpers import write_dataset  # noqa: E402
from sample_runs import run_settings  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _latent_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs that cache latents without a folder use a session temp dir, never the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_SEARCH_CACHE", str(tmp_path_factory.mktemp("lora-search-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _no_log_handler_left_behind() -> None:
    """A command run in-process puts its log handler on the root logger; it goes with the test, so the
    next test's stdout holds only what that test printed."""
    before = list(logging.root.handlers)
    yield
    logging.root.handlers[:] = [h for h in logging.root.handlers
                                if h in before or type(h).__module__.startswith("_pytest")]


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x diffusers folder, built once per session (treat it as read-only)."""
    return tiny_models.save_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL diffusers folder, built once per session (treat it as read-only)."""
    return tiny_models.save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny open_clip model as a ``local-dir:`` folder, built once per session (treat it as read-only)."""
    return tiny_clip.build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def tiny_clip_model(tiny_clip_dir: Path) -> Any:
    """The tiny CLIP loaded through the real loader (``evaluation.load_clip``)."""
    from evaluation.clip_loader import load_clip
    from evaluation.settings import ClipSettings

    return load_clip(ClipSettings(model=f"local-dir:{tiny_clip_dir}", pretrained=""))


@pytest.fixture
def evaluator_settings(tmp_path: Path, tiny_clip_dir: Path) -> Any:
    """Identity and technical quality on the tiny CLIP, references in ``tmp_path/refs`` (see sample_runs)."""
    return run_settings(tmp_path / "refs", tiny_clip_dir)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Two 64x64 images with captions in ``1_ohwx cat``."""
    return write_dataset(tmp_path / "data")


@pytest.fixture
def train_values(tmp_path: Path, tiny_sd15_dir: Path, tiny_dataset: Path) -> dict[str, Any]:
    """Flat kohya keys for a fast CPU run on the tiny model (one optimizer step per epoch)."""
    return {
        "pretrained_model_name_or_path": str(tiny_sd15_dir), "train_data_dir": str(tiny_dataset),
        "resolution": "64", "caption_extension": ".txt", "output_dir": str(tmp_path / "out"),
        "output_name": "lora", "network_dim": 4, "network_alpha": 2.0, "learning_rate": 1e-3,
        "max_train_epochs": 2, "train_batch_size": 2, "seed": 7, "max_data_loader_n_workers": 0,
    }


@pytest.fixture
def make_config(train_values: dict[str, Any]) -> Callable[..., Any]:
    """``make_config(**overrides)`` -> a TrainingConfig over the tiny model and dataset (None drops a key)."""
    from training.config import config_from_dict

    def make(**overrides: Any) -> Any:
        values = {k: v for k, v in {**train_values, **overrides}.items() if v is not None}
        return config_from_dict(values)

    return make
