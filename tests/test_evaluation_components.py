"""The five score components on inputs whose expected ordering is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from evaluation import components as comp
from evaluation.quality import colorfulness, technical_quality
from evaluation.settings import (AdherenceSettings, IdentitySettings, StyleSettings, TechnicalSettings,
                                 VarietySettings)
from tiny_clip import flat_image, pattern_image


def unit(*rows) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


# identity ---------------------------------------------------------------------------------------

def test_samples_equal_to_references_score_identity_one(tiny_clip_model):
    refs = tiny_clip_model.encode_images([pattern_image(1), pattern_image(2)])
    score, raw = comp.identity(refs.clone(), refs, IdentitySettings(aggregation="topk", top_k=1))
    assert score == pytest.approx(1.0, abs=1e-5) and raw == pytest.approx([1.0, 1.0], abs=1e-5)


def test_reference_copy_beats_unrelated_image(tiny_clip_model):
    refs = tiny_clip_model.encode_images([pattern_image(1)])
    samples = tiny_clip_model.encode_images([pattern_image(1), flat_image((230, 30, 30))])
    _, raw = comp.identity(samples, refs, IdentitySettings())
    assert raw[0] == pytest.approx(1.0, abs=1e-5) and raw[1] < raw[0] - 0.05


def test_identity_mean_versus_topk():
    refs = unit([1, 0], [0, 1], [1, 0])
    sample = unit([1, 0])
    mean_score, mean_raw = comp.identity(sample, refs, IdentitySettings(aggregation="mean", low=0.0))
    top_score, top_raw = comp.identity(sample, refs, IdentitySettings(aggregation="topk", top_k=2, low=0.0))
    assert mean_raw == pytest.approx([2 / 3]) and mean_score == pytest.approx(2 / 3)
    assert top_raw == pytest.approx([1.0]) and top_score == pytest.approx(1.0)
    # top_k larger than the number of references falls back to all of them
    _, all_raw = comp.identity(sample, refs, IdentitySettings(aggregation="topk", top_k=10, low=0.0))
    assert all_raw == pytest.approx([2 / 3])


def test_identity_bounds_map_to_zero_and_one():
    refs, sample = unit([1, 0]), unit([1, 1])  # cos = 0.707
    score, _ = comp.identity(sample, refs, IdentitySettings(low=0.5, high=1.0))
    assert score == pytest.approx((math.sqrt(0.5) - 0.5) / 0.5, abs=1e-5)
    below, _ = comp.identity(unit([0, 1]), refs, IdentitySettings(low=0.5, high=1.0))
    assert below == 0.0


# pose variety ------------------------------------------------------------------------------------

def test_identical_samples_have_zero_variety(tiny_clip_model):
    crops = tiny_clip_model.encode_images([pattern_image(7)] * 4)
    score, raw = comp.pose_variety(crops, ["a", "b", "c", "d"], VarietySettings())
    assert score == pytest.approx(0.0, abs=1e-5) and raw == pytest.approx(0.0, abs=1e-5)


def with_border(centre: Image.Image, border_seed: int) -> Image.Image:
    """``centre`` (32 px) pasted in the middle of a 64 px background that differs per seed."""
    image = pattern_image(border_seed, size=64, cells=4)
    image.paste(centre, (16, 16))
    return image


def test_background_changes_do_not_count_as_pose_variety(tiny_clip_model):
    settings = VarietySettings(center_crop=0.5)
    same_subject = [with_border(pattern_image(1, size=32), seed) for seed in (10, 11, 12)]
    new_subjects = [with_border(pattern_image(s, size=32), 10) for s in (1, 2, 3)]

    def variety(images):
        crops = tiny_clip_model.encode_images([comp.centre_crop(im, settings.center_crop) for im in images])
        return comp.pose_variety(crops, ["p1", "p2", "p3"], settings)[1]

    whole = tiny_clip_model.encode_images(same_subject)
    assert comp.pose_variety(whole, ["p1", "p2", "p3"], settings)[1] > 1e-4  # whole images do differ
    assert variety(same_subject) == pytest.approx(0.0, abs=1e-6)
    assert variety(new_subjects) > 1e-4


def test_variety_uses_same_prompt_pairs_when_prompts_repeat():
    # prompt "a" sampled twice with different poses, "b" once with a very different background
    emb = unit([1, 0, 0], [0.8, 0.6, 0], [0, 0, 1])
    _, raw = comp.pose_variety(emb, ["a", "a", "b"], VarietySettings(full_at=0.5))
    assert raw == pytest.approx(1 - 0.8)
    _, raw_all = comp.pose_variety(emb, ["a", "b", "c"], VarietySettings(full_at=0.5))
    assert raw_all == pytest.approx(((1 - 0.8) + 1 + 1) / 3)


def test_variety_scales_to_full_at_and_single_sample_is_zero():
    emb = unit([1, 0], [0, 1])  # 1 - cos = 1
    assert comp.pose_variety(emb, ["a", "b"], VarietySettings(full_at=0.25))[0] == 1.0
    assert comp.pose_variety(emb[:1], ["a"], VarietySettings()) == (0.0, 0.0)


def test_centre_crop_keeps_the_middle():
    image = flat_image((0, 0, 0), size=100)
    image.paste((255, 255, 255), (30, 30, 70, 70))
    crop = comp.centre_crop(image, 0.4)
    assert crop.size == (40, 40) and np.asarray(crop).min() == 255


# style and adherence -------------------------------------------------------------------------------

def test_style_is_cosine_to_the_centroid():
    style_images = unit([1, 0], [0, 1])  # centroid direction (1, 1)
    samples = unit([1, 1], [1, 0])
    score, raw = comp.style(samples, style_images, StyleSettings(low=0.0, high=1.0))
    assert raw == pytest.approx([1.0, math.sqrt(0.5)], abs=1e-6)
    assert score == pytest.approx((1 + math.sqrt(0.5)) / 2, abs=1e-6)


def test_adherence_pairs_each_sample_with_its_own_prompt():
    images = unit([1, 0], [0, 1])
    prompts = unit([1, 0], [1, 0])
    score, raw = comp.prompt_adherence(images, prompts, AdherenceSettings(low=0.0, high=1.0))
    assert raw == pytest.approx([1.0, 0.0]) and score == pytest.approx(0.5)
    # raw CLIP-T of 0.25 lies in the middle of the default 0.15..0.35 bounds
    assert comp.normalize(0.25, 0.15, 0.35) == pytest.approx(0.5)


# technical quality ----------------------------------------------------------------------------------

def natural_image(size: int = 128) -> Image.Image:
    """Colourful, mid-exposed, with edges: the kind of image that should score well."""
    return pattern_image(3, size=size, cells=16)


def test_blurred_image_scores_lower_sharpness_and_quality():
    s = TechnicalSettings()
    sharp = natural_image()
    blurred = sharp.filter(ImageFilter.GaussianBlur(4))
    sharp_total, sharp_parts = technical_quality(sharp, s)
    blur_total, blur_parts = technical_quality(blurred, s)
    assert blur_parts["sharpness"] < sharp_parts["sharpness"]
    assert blur_parts["laplacian_variance"] < sharp_parts["laplacian_variance"] / 10
    assert blur_total < sharp_total


def test_dark_and_clipped_images_score_lower_exposure():
    s = TechnicalSettings()
    base = np.asarray(natural_image(), dtype=np.float64)
    dark = Image.fromarray((base * 0.08).astype(np.uint8))
    blown = Image.fromarray(np.clip(base * 4, 0, 255).astype(np.uint8))
    good_total, good = technical_quality(natural_image(), s)
    dark_total, dark_parts = technical_quality(dark, s)
    blown_total, blown_parts = technical_quality(blown, s)
    assert dark_parts["exposure"] < good["exposure"] and dark_parts["clipping"] < good["clipping"]
    assert blown_parts["clipping"] < good["clipping"]
    assert dark_total < good_total and blown_total < good_total


def test_flat_grey_image_has_no_contrast_or_colour():
    total, parts = technical_quality(flat_image((128, 128, 128)), TechnicalSettings())
    assert parts["contrast"] == 0.0 and parts["colorfulness"] == 0.0 and parts["sharpness"] == 0.0
    assert parts["exposure"] == 1.0 and parts["clipping"] == 1.0
    assert total == pytest.approx(0.4)
    assert 0.0 <= technical_quality(natural_image(), TechnicalSettings())[0] <= 1.0


def test_colorfulness_matches_the_hasler_suesstrunk_formula():
    rgb = np.zeros((2, 2, 3))
    rgb[0, :, 0] = 200  # half red, half black
    rg, yb = rgb[..., 0] - rgb[..., 1], (rgb[..., 0] + rgb[..., 1]) / 2 - rgb[..., 2]
    expected = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
    assert colorfulness(rgb) == pytest.approx(expected)
    assert colorfulness(np.full((4, 4, 3), 90.0)) == 0.0
