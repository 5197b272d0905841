"""Compile cost: short last batches are padded (one step shape per bucket) without changing what is learned,
and a compiled run compiles a few graphs however many buckets its dataset has."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import write_dataset
from helpers import loaded_benchmark


@pytest.fixture(scope="module")
def shapes_bench():
    yield from loaded_benchmark("compile_shapes.py")


def _items(sizes_and_repeats):
    from training.data import ImageItem

    return [ImageItem(path=Path(f"{r}_x/img{i}.png"), caption="x", caption_missing=False, repeats=r, class_tokens="x",
                      width=w, height=h) for i, (w, h, r) in enumerate(sizes_and_repeats)]


def test_a_short_last_batch_is_one_more_shape_unless_padded():
    from training.data import step_shapes

    # bucket 64x64: 5 examples at batch 2 -> 2 full batches and one of 1; bucket 64x32: 4 examples -> 2 full.
    items = _items([(64, 64, 3), (64, 64, 2), (64, 32, 4)])
    buckets = [(64, 64), (64, 64), (64, 32)]
    assert step_shapes(items, buckets, 2, padded=False) == {(2, 64, 64): 2, (1, 64, 64): 1, (2, 64, 32): 2}
    assert step_shapes(items, buckets, 2) == {(2, 64, 64): 3, (2, 64, 32): 2}


def test_a_padded_batch_repeats_its_own_examples_and_weighs_them_zero(tmp_path):
    from training.config import TrainingConfig
    from training.data import TrainDataset

    write_dataset(tmp_path / "data", images=3)
    cfg = TrainingConfig(train_data_dir=str(tmp_path / "data"), resolution="64", caption_extension=".txt")
    dataset = TrainDataset.from_config(cfg)
    short = dataset.make_batch([2], seed=1, epoch=1, batch_no=0)
    padded = dataset.make_batch([2], seed=1, epoch=1, batch_no=0, pad_to=3)
    assert padded.indices == [2, 2, 2] and padded.pixels.shape[0] == 3
    assert padded.weights.tolist() == [3.0, 0.0, 0.0]  # the batch mean is the real example's loss
    assert padded.captions[0] == short.captions[0] and torch.equal(padded.pixels[0], short.pixels[0])
    assert dataset.make_batch([0, 1, 2], seed=1, epoch=1, batch_no=0, pad_to=3).weights is None


def test_a_padded_batch_gives_the_short_batchs_loss_and_gradients():
    from training.fast import UnetLoss
    from training.tiny import tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet()
    step = UnetLoss(unet, None, torch.device("cpu"))
    cfg = unet.config
    noisy = torch.randn(1, cfg.in_channels, 16, 16)
    args = (noisy, torch.tensor([500]), torch.randn(1, 77, cfg.cross_attention_dim), None, torch.randn_like(noisy))

    def loss_and_grads(tensors, weights):
        unet.zero_grad()
        loss = step.eager(*tensors, weights)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in unet.parameters() if p.grad is not None]

    short_loss, short_grads = loss_and_grads(args, torch.tensor([0.7]))  # a min-SNR weight of 0.7
    def with_filler_row(a):  # a second row of other values, which must not count
        other = torch.full_like(a, 999) if a.dtype == torch.long else torch.randn_like(a)
        return torch.cat([a, other]) if isinstance(a, torch.Tensor) else a

    filler = [with_filler_row(a) if isinstance(a, torch.Tensor) else a for a in args]
    padded_loss, padded_grads = loss_and_grads(filler, torch.tensor([2 * 0.7, 0.0]))
    torch.testing.assert_close(padded_loss, short_loss)
    for a, b in zip(padded_grads, short_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_compiled_run_over_many_buckets_compiles_a_few_graphs(make_config, tmp_path, monkeypatch, caplog):
    """Four buckets, each with a short last batch: eight step shapes as sd-scripts batches them, four once
    padded, and two or three graphs compiled (the first bucket static, then one with symbolic sizes)."""
    data = tmp_path / "buckets"
    for name, size in (("a", (64, 64)), ("b", (64, 32)), ("c", (32, 64)), ("d", (96, 32))):
        write_dataset(data, images=3, name=f"ohwx {name}", size=size)
    cfg = make_config(train_data_dir=str(data), network_train_unet_only=True, max_train_epochs=1, train_batch_size=2,
                      cache_latents=True, enable_bucket=True, bucket_no_upscale=True, bucket_reso_steps=32,
                      min_bucket_reso=32, resolution="96", torch_compile=True, dynamo_backend="aot_eager")
    from training import train
    from training.data import TrainDataset

    dataset = TrainDataset.from_config(cfg)
    assert len(dataset.step_shapes(2, padded=False)) == 8 and len(dataset.step_shapes(2)) == 4
    monkeypatch.delenv("LORA_SEARCH_EAGER", raising=False)
    caplog.set_level(logging.INFO, logger="training")
    result = train(cfg)
    compiled = [r.getMessage() for r in caplog.records if "UNet step compiled for input" in r.getMessage()]
    assert 1 <= len(compiled) <= 3 and all(" 2x4x" in line for line in compiled), compiled
    assert "4 batch shape(s), one per bucket" in caplog.text
    assert f"training took {result.seconds:.1f} s: {result.compile_seconds:.1f} s compiling" in caplog.text
    assert 0 < result.compile_seconds < result.seconds


def test_the_count_for_a_realistic_layout(shapes_bench, capsys):
    """benchmarks/compile_shapes.py on the made-up 400-image layout under configs/base.toml."""
    assert shapes_bench.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    numbers = {line.split(":")[0]: int(line.rsplit(":", 1)[1].split()[0]) for line in lines[1:4]}
    buckets = numbers["buckets"]
    unpadded = numbers["step shapes to compile, short last batches as they are (sd-scripts)"]
    padded = numbers["step shapes to compile, short last batches padded (lora-search)"]
    assert buckets > 10 and padded == buckets < unpadded
