"""Sample prompts longer than 75 tokens follow ``max_token_length`` as training captions do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import config_from_dict
from training.models import load_models
from training.sampling import count_tokens, sample_images

# The tiny tokenizer has no merges: every letter is one token, so "x" * 76 is 76 tokens.
HEAD = "x" * 76
SHORT = "a red cat"
OPTIONS = "--w 64 --h 64 --s 2 --d 3 --l 7"


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def models(request):
    """The tiny SD 1.x or SDXL model, loaded once through the real loader (sampling leaves it unchanged)."""
    folder = request.getfixturevalue(f"tiny_{request.param}_dir")
    return load_models(config_from_dict({"pretrained_model_name_or_path": str(folder)}))


def sample(models, tmp_path, lines: list[str], max_token_length=None) -> list[np.ndarray]:
    """Sample one image per prompt line with a config of ``max_token_length``; the images as arrays."""
    out = tmp_path / f"out-{max_token_length}"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"{line} {OPTIONS}" for line in lines) + "\n", encoding="utf-8")
    values = {"pretrained_model_name_or_path": models.source, "output_dir": str(out), "output_name": "s",
              "sample_prompts": str(prompts), "sample_sampler": "ddim"}
    if max_token_length:
        values["max_token_length"] = max_token_length
    paths = sample_images(config_from_dict(values), models, 1, torch.device("cpu"))
    return [np.asarray(Image.open(p)).astype(int) for p in paths]


def test_words_after_token_75_change_the_image_only_with_a_longer_max_token_length(models, tmp_path):
    assert count_tokens(models, HEAD) == 76
    lines = [f"{HEAD} red cat", f"{HEAD} blue dog",  # prompts that differ after token 75
             f"{SHORT} --n {HEAD} blurry", f"{SHORT} --n {HEAD} sharp"]  # negatives that do
    cut = sample(models, tmp_path, lines)
    assert np.array_equal(cut[0], cut[1]) and np.array_equal(cut[2], cut[3])
    long = sample(models, tmp_path, lines, max_token_length=150)
    assert not np.array_equal(long[0], long[1])
    assert not np.array_equal(long[2], long[3])


def test_short_prompts_sample_the_same_with_any_max_token_length(models, tmp_path):
    """Prompts within 75 tokens are encoded as the pipeline itself encodes them (empty negative included)."""
    lines = [SHORT, f"{SHORT} --n blurry"]
    plain = sample(models, tmp_path, lines)
    for got, want in zip(sample(models, tmp_path, lines, max_token_length=225), plain):
        assert np.abs(got - want).max() <= 1
