"""Shared fixtures: a tiny SD 1.x model folder, a tiny kohya dataset and training configs over them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can import tiny_models and friends

import tiny_models  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _latent_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs that cache latents without a folder use a session temp dir, never the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_SEARCH_CACHE", str(tmp_path_factory.mktemp("lora-search-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x diffusers folder, built once per session (treat it as read-only)."""
    return tiny_models.save_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL diffusers folder, built once per session (treat it as read-only)."""
    return tiny_models.save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def write_dataset(root: Path, images: int = 2, repeats: int = 1, name: str = "ohwx cat",
                  size: tuple[int, int] = (64, 64)) -> Path:
    """A kohya dataset ``root/{repeats}_{name}/`` of random RGB images with ``.txt`` captions."""
    import numpy as np
    from PIL import Image

    folder = root / f"{repeats}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"ohwx, cat, tag{i}, red", encoding="utf-8")
    return root


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
