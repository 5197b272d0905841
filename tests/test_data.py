"""Dataset folders, captions, buckets, pixels, epoch order and the latent cache."""

import logging
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.buckets import BucketFit, assign_bucket, make_buckets
from training.config import TrainingConfig
from training.data import (DataOptions, DatasetError, TrainDataset, count_batches, epoch_batches,
                           fit_items, load_pixels, process_caption, scan_dataset)
from training.errors import ConfigError, LoraSearchError
from training.latent_cache import LatentCache


def save_image(path: Path, size=(32, 32), color=(200, 30, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture
def dataset_dir(tmp_path):
    root = tmp_path / "train"
    save_image(root / "3_ohwx woman" / "a.png", (64, 32))
    (root / "3_ohwx woman" / "a.txt").write_text("ohwx woman, red dress, smiling\n", encoding="utf-8")
    save_image(root / "3_ohwx woman" / "b.jpg", (32, 64), (20, 200, 20))
    save_image(root / "1_style" / "c.webp", (48, 48), (20, 20, 200))
    (root / "1_style" / "c.txt").write_text("a painting", encoding="utf-8")
    save_image(root / "notes" / "d.png")
    (root / "3_ohwx woman" / "readme.md").write_text("not an image")
    return root


def options(**kw) -> DataOptions:
    base = dict(resolution=(32, 32), bucket_reso_steps=8, min_bucket_reso=16, max_bucket_reso=64)
    base.update(kw)
    return DataOptions(**base)


# --------------------------------------------------------------------------- scanning


def test_scan_reads_repeats_class_tokens_and_captions(dataset_dir, caplog):
    with caplog.at_level(logging.WARNING):
        items = scan_dataset(dataset_dir, ".txt")
    assert [(i.path.name, i.repeats, i.class_tokens) for i in items] == [
        ("c.webp", 1, "style"), ("a.png", 3, "ohwx woman"), ("b.jpg", 3, "ohwx woman")]
    a, b = items[1], items[2]
    assert (a.caption, a.caption_missing, a.width, a.height) == ("ohwx woman, red dress, smiling", False, 64, 32)
    assert (b.caption, b.caption_missing, b.width, b.height) == ("ohwx woman", True, 32, 64)
    assert "notes" in caplog.text and "skipping folder" in caplog.text  # the folder without repeats
    assert "have no .txt caption" in caplog.text


def test_caption_extension_without_dot_and_default(dataset_dir):
    assert scan_dataset(dataset_dir, "txt")[1].caption_missing is False
    # the default extension is .caption, so every caption here is missing
    assert all(item.caption_missing for item in scan_dataset(dataset_dir))


def test_exif_rotation_swaps_the_reported_size(tmp_path):
    path = tmp_path / "train" / "1_x" / "rotated.jpg"
    path.parent.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (64, 32), (255, 0, 0)).save(path, exif=exif)
    (item,) = scan_dataset(tmp_path / "train")
    assert (item.width, item.height) == (32, 64)
    pixels = load_pixels(item.path, BucketFit(bucket=(32, 64), resized=(32, 64)))
    assert pixels.shape == (3, 64, 32)


@pytest.mark.parametrize("content", [b"this is not an image", "truncated"])
def test_unreadable_image_is_named_with_the_fix(tmp_path, content):
    bad = tmp_path / "train" / "2_x" / "bad.png"
    save_image(tmp_path / "train" / "2_x" / "good.png")
    if content == "truncated":
        save_image(bad, (64, 64))
        bad.write_bytes(bad.read_bytes()[:-30])
    else:
        bad.write_bytes(content)
    with pytest.raises(DatasetError) as err:
        scan_dataset(tmp_path / "train")
    message = str(err.value)
    assert isinstance(err.value, LoraSearchError)
    assert str(bad) in message and "remove it" in message and "\n" not in message
    assert [i.path.name for i in scan_dataset(tmp_path / "train", skip_unreadable=True)] == ["good.png"]


def test_empty_and_missing_dataset(tmp_path):
    (tmp_path / "empty" / "5_nothing").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training images found in .*N_name"):
        scan_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="is not a folder; check the path"):
        scan_dataset(tmp_path / "missing")
    with pytest.raises(ConfigError, match="train_data_dir is not set"):
        scan_dataset(None)


# --------------------------------------------------------------------------- captions


def test_caption_keep_tokens_and_shuffle():
    caption = "ohwx, woman, red dress, smiling, outdoors, hat"
    outputs = {process_caption(caption, 2, True, 0.0, random.Random(seed)) for seed in range(30)}
    assert len(outputs) > 5
    for out in outputs:
        tags = out.split(", ")
        assert tags[:2] == ["ohwx", "woman"]
        assert sorted(tags) == sorted(caption.split(", "))
    assert process_caption(caption, 2, False, 0.0, random.Random(0)) == caption


def test_caption_dropout_rate():
    rng = random.Random(0)
    dropped = sum(process_caption("a, b", 0, False, 0.3, rng) == "" for _ in range(4000))
    assert 0.25 < dropped / 4000 < 0.35
    assert all(process_caption("a, b", 0, True, 0.0, rng) for _ in range(200))


# --------------------------------------------------------------------------- buckets


def test_make_buckets_sizes():
    buckets = make_buckets((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= min(w, h) and max(w, h) <= 1024
        assert w * h <= 512 * 512
    assert make_buckets((512, 512), no_upscale=True) == []


@pytest.mark.parametrize("size, bucket, resized", [
    ((512, 512), (512, 512), (512, 512)),
    ((1024, 1024), (512, 512), (512, 512)),
    ((768, 512), (640, 384), (640, 427)),      # landscape: heights match, sides cropped
    ((512, 768), (384, 640), (427, 640)),      # portrait
    ((1000, 300), (832, 256), (853, 256)),     # very wide: the widest bucket
    ((640, 384), (640, 384), (640, 384)),      # an exact bucket size is kept as is
])
def test_assign_bucket_nearest_aspect(size, bucket, resized):
    fit = assign_bucket(*size, make_buckets((512, 512), 256, 1024, 64), (512, 512), 64)
    assert (fit.bucket, fit.resized) == (bucket, resized)


@pytest.mark.parametrize("size, bucket, resized", [
    ((300, 200), (256, 192), (300, 200)),      # smaller than the area: own size, rounded down, no upscale
    ((2000, 1000), (640, 320), (640, 320)),    # larger: shrunk to the area first
    ((1024, 1024), (512, 512), (512, 512)),
])
def test_assign_bucket_no_upscale(size, bucket, resized):
    fit = assign_bucket(*size, [], (512, 512), 64, no_upscale=True)
    assert (fit.bucket, fit.resized) == (bucket, resized)


def test_without_bucketing_every_image_is_cropped_to_the_resolution(dataset_dir):
    items = scan_dataset(dataset_dir, ".txt")
    assert {fit.bucket for fit in fit_items(items, options())} == {(32, 32)}
    bucketed = fit_items(items, options(enable_bucket=True))
    assert [fit.bucket for fit in bucketed] == [(32, 32), (40, 24), (24, 40)]


def test_image_smaller_than_a_step_with_no_upscale(tmp_path):
    save_image(tmp_path / "t" / "1_x" / "tiny.png", (40, 4))
    items = scan_dataset(tmp_path / "t")
    with pytest.raises(DatasetError, match="tiny.png .* smaller than bucket_reso_steps"):
        fit_items(items, options(enable_bucket=True, bucket_no_upscale=True))


def test_options_from_config_check_resolution():
    assert DataOptions.from_config(TrainingConfig(resolution="512,768")).resolution == (512, 768)
    with pytest.raises(ConfigError, match="resolution is not set"):
        DataOptions.from_config(TrainingConfig())
    with pytest.raises(ConfigError, match="multiple of bucket_reso_steps"):
        DataOptions.from_config(TrainingConfig(resolution="500"))
    with pytest.raises(ConfigError, match="between min_bucket_reso"):
        DataOptions.from_config(TrainingConfig(resolution="2048", enable_bucket=True))


# --------------------------------------------------------------------------- pixels


def test_pixels_center_crop_flip_and_range(tmp_path):
    img = Image.new("RGB", (96, 32), (255, 0, 0))
    img.paste((0, 255, 0), (32, 0, 64, 32))
    img.paste((0, 0, 255), (64, 0, 96, 32))
    img.putpixel((32, 0), (255, 255, 255))  # marks the crop's top-left corner
    img.save(tmp_path / "rgb.png")
    fit = assign_bucket(96, 32, [(32, 32)], (32, 32), 8)
    pixels = load_pixels(tmp_path / "rgb.png", fit)
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.allclose(pixels[:, 16, 16], torch.tensor([-1.0, 1.0, -1.0]))  # the green middle third
    assert torch.allclose(pixels[:, 0, 0], torch.ones(3))
    flipped = load_pixels(tmp_path / "rgb.png", fit, flip=True)
    assert torch.equal(flipped, pixels.flip(-1))


def test_transparency_is_composited_on_white(tmp_path):
    save_image(tmp_path / "clear.png", (32, 32), (0, 0, 0, 0), mode="RGBA")
    pixels = load_pixels(tmp_path / "clear.png", BucketFit((32, 32), (32, 32)))
    assert torch.allclose(pixels, torch.ones_like(pixels))


def test_color_aug_changes_some_examples_but_keeps_shape(tmp_path):
    save_image(tmp_path / "c.png", (32, 32), (180, 60, 40))
    fit = BucketFit((32, 32), (32, 32))
    plain = load_pixels(tmp_path / "c.png", fit)
    outs = [load_pixels(tmp_path / "c.png", fit, color_rng=random.Random(s)) for s in range(20)]
    assert all(o.shape == plain.shape and o.min() >= -1 and o.max() <= 1 for o in outs)
    changed = sum(not torch.allclose(o, plain, atol=1e-3) for o in outs)
    assert 0 < changed < 20


# --------------------------------------------------------------------------- epoch order


def test_epoch_batches_are_deterministic_and_complete(dataset_dir):
    dataset = TrainDataset(scan_dataset(dataset_dir, ".txt"), options(enable_bucket=True))
    first = dataset.epoch_batches(2, seed=42, epoch=3)
    assert first == dataset.epoch_batches(2, seed=42, epoch=3)
    assert first != dataset.epoch_batches(2, seed=42, epoch=4)
    assert first != dataset.epoch_batches(2, seed=43, epoch=3)
    counts = Counter(index for batch in first for index in batch)
    assert counts == {i: item.repeats for i, item in enumerate(dataset.items)}
    for batch in first:
        assert 1 <= len(batch) <= 2
        assert len({dataset.fits[i].bucket for i in batch}) == 1
    assert len(first) == dataset.batches_per_epoch(2) == count_batches(dataset.items, dataset.buckets, 2)


def test_epoch_order_shuffles_across_epochs(tmp_path):
    for n in range(8):
        save_image(tmp_path / "d" / "2_x" / f"{n}.png", (32, 32), (n * 30, 0, 0))
    items = scan_dataset(tmp_path / "d")
    buckets = [(32, 32)] * len(items)
    orders = {tuple(map(tuple, epoch_batches(items, buckets, 4, 1, epoch))) for epoch in range(5)}
    assert len(orders) == 5
    assert all(len(b) == 4 for b in epoch_batches(items, buckets, 4, 1, 0))


def test_make_batch_is_reproducible_and_uses_cached_latents(dataset_dir):
    dataset = TrainDataset(scan_dataset(dataset_dir, ".txt"),
                           options(flip_aug=True, shuffle_caption=True, keep_tokens=1))
    batch_indices = dataset.epoch_batches(3, seed=5, epoch=0)[0]
    one = dataset.make_batch(batch_indices, seed=5, epoch=0, batch_no=0)
    two = dataset.make_batch(batch_indices, seed=5, epoch=0, batch_no=0)
    assert one.captions == two.captions and one.flipped == two.flipped and torch.equal(one.pixels, two.pixels)
    assert one.pixels.shape == (len(batch_indices), 3, 32, 32) and one.latents is None
    flips = [f for s in range(10) for f in dataset.make_batch([0, 1], 5, 0, s).flipped]
    assert True in flips and False in flips
    latents = [torch.full((4, 4, 4), float(i)) for i in range(len(dataset))]
    flipped = [-t for t in latents]
    cached = dataset.make_batch(batch_indices, seed=5, epoch=0, batch_no=0, latents=latents,
                                flipped_latents=flipped)
    assert cached.pixels is None and cached.captions == one.captions
    for row, index, flip in zip(cached.latents, batch_indices, one.flipped):
        assert torch.equal(row, flipped[index] if flip else latents[index])


def test_color_aug_refuses_cached_latents(dataset_dir):
    dataset = TrainDataset(scan_dataset(dataset_dir, ".txt"), options(color_aug=True))
    with pytest.raises(ConfigError, match="color_aug cannot use cached latents"):
        dataset.make_batch([0], 1, 0, 0, latents=[torch.zeros(4, 4, 4)] * 3)


# --------------------------------------------------------------------------- latent cache


class CountingEncoder:
    """A stand-in VAE: 8x average pooling; counts calls and images."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, pixels):
        self.calls += 1
        self.images += pixels.shape[0]
        return F.avg_pool2d(pixels, 8)


def test_latent_cache_hit_does_not_encode_again(dataset_dir, tmp_path):
    dataset = TrainDataset(scan_dataset(dataset_dir, ".txt"), options(enable_bucket=True))
    encoder, cache = CountingEncoder(), LatentCache(tmp_path / "cache")
    first = cache.get_or_encode(dataset.items, dataset.fits, encoder, "vae-a", batch_size=4)
    assert encoder.images == 3 and encoder.calls == 3  # three bucket sizes, one batch each
    assert first[1].shape == (3, 3, 5)  # a.png: bucket 40x24
    expected = F.avg_pool2d(load_pixels(dataset.items[1].path, dataset.fits[1]).unsqueeze(0), 8)[0]
    assert torch.allclose(first[1], expected)
    again = LatentCache(tmp_path / "cache").get_or_encode(dataset.items, dataset.fits, encoder, "vae-a")
    assert encoder.calls == 3
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    cache.get_or_encode(dataset.items, dataset.fits, encoder, "vae-b")  # another model
    assert encoder.images == 6


def test_latent_cache_is_never_stale(dataset_dir, tmp_path):
    items = scan_dataset(dataset_dir, ".txt")
    fits = fit_items(items, options())
    encoder, cache = CountingEncoder(), LatentCache(tmp_path / "cache")
    before = cache.get_or_encode(items, fits, encoder, "vae")
    save_image(items[0].path, (48, 48), (250, 250, 250))  # the user edits one image
    after = cache.get_or_encode(items, fits, encoder, "vae")
    assert encoder.images == 4  # only the edited image is encoded again
    assert not torch.allclose(before[0], after[0])
    assert torch.equal(before[1], after[1])
    bigger = fit_items(items, options(resolution=(64, 64)))  # another resolution
    assert cache.get_or_encode(items, bigger, encoder, "vae")[0].shape == (3, 8, 8)
    assert encoder.images == 7


def test_partial_cache_entry_is_encoded_again(dataset_dir, tmp_path):
    items = scan_dataset(dataset_dir, ".txt")
    fits = fit_items(items, options())
    encoder, cache = CountingEncoder(), LatentCache(tmp_path / "cache")
    good = cache.get_or_encode(items, fits, encoder, "vae")
    from training.latent_cache import file_sha256
    entry = cache.entry_path("vae", file_sha256(items[2].path), fits[2], False)
    entry.write_bytes(entry.read_bytes()[:40])  # a torn copy
    recovered = cache.get_or_encode(items, fits, encoder, "vae")
    assert encoder.images == 4
    assert torch.equal(recovered[2], good[2])
    cache.get_or_encode(items, fits, encoder, "vae")
    assert encoder.images == 4  # and the entry was rewritten whole


def test_flip_aug_caches_both_orientations(dataset_dir, tmp_path):
    dataset = TrainDataset(scan_dataset(dataset_dir, ".txt"), options(flip_aug=True, resolution=(64, 64)))
    encoder, cache = CountingEncoder(), LatentCache(tmp_path / "cache")
    latents, flipped = cache.encode_dataset(dataset, encoder, "vae", batch_size=2)
    assert encoder.images == 6
    assert torch.allclose(flipped[1], latents[1].flip(-1))  # pooling commutes with mirroring
    cache.encode_dataset(dataset, encoder, "vae")
    assert encoder.images == 6
    no_flip = TrainDataset(dataset.items, options(resolution=(64, 64)))
    assert cache.encode_dataset(no_flip, encoder, "vae")[1] is None
