"""The fast training step (training/fast.py) against the plain one: same losses, same weights, resumable.

On the CPU the compiled step runs inductor's C++ kernels; on a GPU it would add CUDA graphs, which no
test here can reach (benchmarks/train_step.py measures those). Tolerances: per-step losses of a compiled
run and a plain one agree to 1e-4 relative (float32; inductor fuses and reorders reductions), final LoRA
weights to 1e-5 absolute after 4 AdamW steps at lr 1e-3.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_dataset

ROOT = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-5


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compiled-kernel cache for this module, so only the first compile of a shape pays code generation."""
    folder = tmp_path_factory.mktemp("torch-compile-cache")
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def _unet_only(make_config, tmp_path: Path, out: str, **overrides):
    data = tmp_path / "data4"
    if not data.is_dir():
        write_dataset(data, images=4)
    values = dict(train_data_dir=str(data), output_dir=str(tmp_path / out), network_train_unet_only=True,
                  max_train_epochs=2, train_batch_size=2, min_snr_gamma=5.0, noise_offset=0.05,
                  caption_dropout_rate=0.2, cache_latents=True)
    return make_config(**{**values, **overrides})


def _train(cfg, eager: bool, monkeypatch, **kwargs):
    from training import train

    events = []
    with monkeypatch.context() as mp:
        if eager:
            mp.setenv("LORA_SEARCH_EAGER", "1")
        else:
            mp.delenv("LORA_SEARCH_EAGER", raising=False)
        result = train(cfg, on_epoch_end=events.append, **kwargs)
    return result, [loss for e in events for loss in e.losses]


def _assert_close_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=key)


def test_compiled_run_trains_like_the_plain_run(make_config, tmp_path, monkeypatch, compile_cache, caplog):
    caplog.set_level(logging.INFO, logger="training")
    plain, plain_losses = _train(_unet_only(make_config, tmp_path, "plain"), True, monkeypatch)
    fast, fast_losses = _train(_unet_only(make_config, tmp_path, "fast", torch_compile=True), False, monkeypatch)

    assert len(plain_losses) == len(fast_losses) == 4
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=LOSS_RTOL, atol=0)
    _assert_close_weights(fast.checkpoint, plain.checkpoint, WEIGHT_ATOL)
    # The fast run compiled (it did not quietly fall back) and read its captions from the cache.
    assert "UNet step compiled for input 2x4x16x16" in caplog.text
    assert "text embeddings of 5 captions cached" in caplog.text  # 4 captions and the dropped-out ""
    assert "failed" not in caplog.text
    assert any(compile_cache.rglob("*")), "the compiled kernels were not written to the cache folder"


def test_a_new_process_reuses_the_compiled_kernels(make_config, tmp_path, monkeypatch, compile_cache):
    """A trial in a fresh worker process finds its graphs in the on-disk cache instead of compiling them,
    also when its network_alpha differs (the search samples alpha for every trial)."""
    from training.config import write_config

    cfg = _unet_only(make_config, tmp_path, "first", torch_compile=True)
    write_config(tmp_path / "first.toml", cfg.to_dict())
    write_config(tmp_path / "second.toml", {**cfg.to_dict(), "output_dir": str(tmp_path / "second"),
                                            "network_alpha": 3.0})
    script = textwrap.dedent("""
        import json, sys
        from training import train
        from training.config import load_training_config
        import training.fast as fast
        seen = []
        original = fast.Compiled._note_compile
        def note(self, *args):
            original(self, *args)
            seen.append(self.compiles[-1])
        fast.Compiled._note_compile = note
        train(load_training_config(sys.argv[1]))
        print(json.dumps(seen))
    """)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(compile_cache), "PYTHONPATH": str(ROOT)}
    env.pop("LORA_SEARCH_EAGER", None)
    runs = []
    for name in ("first", "second"):
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{name}.toml")], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    second = runs[1]
    assert second and all(entry["cache_misses"] == 0 and entry["cache_hits"] > 0 for entry in second), runs
    assert load_file(str(tmp_path / "second" / "lora.safetensors")).keys() == \
        load_file(str(tmp_path / "first" / "lora.safetensors")).keys()


def test_compiled_text_encoder_run_with_adamw8bit_trains_like_the_plain_run(make_config, tmp_path, monkeypatch,
                                                                           compile_cache, caplog):
    """The search's usual set-up: text-encoder LoRA trained (so it runs, compiled, in every step), AdamW8bit."""
    caplog.set_level(logging.INFO, logger="training")

    def config(out):
        return _unet_only(make_config, tmp_path, out, network_train_unet_only=False, text_encoder_lr=5e-4,
                          optimizer_type="AdamW8bit", torch_compile=True, max_train_epochs=3)

    plain, plain_losses = _train(config("plain"), True, monkeypatch)
    fast, fast_losses = _train(config("fast"), False, monkeypatch)
    assert "text encoder compiled for input" in caplog.text and "UNet step compiled" in caplog.text
    assert "failed" not in caplog.text
    assert len(fast_losses) == 6
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=LOSS_RTOL, atol=0)
    _assert_close_weights(fast.checkpoint, plain.checkpoint, WEIGHT_ATOL)


def test_compiled_run_with_network_dropout_resumes_exactly(make_config, tmp_path, monkeypatch, compile_cache,
                                                           caplog):
    """Dropout draws its numbers inside the compiled code; a resumed run still repeats them (the RNG state is saved)."""
    from training import train

    caplog.set_level(logging.INFO, logger="training")
    class Stop(Exception):
        pass

    def config(out):
        return _unet_only(make_config, tmp_path, out, network_dropout=0.1, torch_compile=True, max_train_epochs=3,
                          save_state=True)

    straight, straight_losses = _train(config("straight"), False, monkeypatch)
    cfg = config("resumed")

    def stop_after_first(event):
        if event.epoch == 1:
            raise Stop

    monkeypatch.delenv("LORA_SEARCH_EAGER", raising=False)
    with pytest.raises(Stop):
        train(cfg, on_epoch_end=stop_after_first)
    resumed, losses = _train(cfg, False, monkeypatch, resume=True)
    assert "UNet step compiled" in caplog.text and "failed" not in caplog.text
    assert losses == straight_losses[2:]  # epochs 2 and 3, step for step
    _assert_close_weights(resumed.checkpoint, straight.checkpoint, 0)


# --- the pieces ------------------------------------------------------------------------------------------

def _tiny_unet_inputs(seed: int = 0):
    from training.tiny import tiny_unet

    torch.manual_seed(seed)
    unet = tiny_unet()
    cfg = unet.config
    noisy = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    args = (noisy, torch.tensor([10, 700]), torch.randn(2, 77, cfg.cross_attention_dim), None,
            torch.randn_like(noisy), None)
    return unet, args


def test_out_of_memory_inside_the_compiled_step_is_not_swallowed():
    from training.fast import UnetLoss

    def runs_out_of_memory(graph, example_inputs):
        def run(*inputs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run

    unet, args = _tiny_unet_inputs()
    step = UnetLoss(unet, None, torch.device("cpu"), compile=True, backend=runs_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        step(*args)


def test_caption_cache_gives_what_the_text_encoders_give(tiny_sdxl_dir):
    from training.config import TrainingConfig
    from training.data import Batch
    from training.fast import CaptionCache
    from training.models import encode_captions, load_models

    models = load_models(TrainingConfig(pretrained_model_name_or_path=str(tiny_sdxl_dir)))
    device = torch.device("cpu")
    captions = ["ohwx, cat, red", "ohwx, cat, blue", ""]
    cache = CaptionCache(models, captions, device, clip_skip=None, max_token_length=150, autocast_dtype=None)
    batch = Batch(indices=[0, 1], captions=["ohwx, cat, blue", ""], flipped=[False, False], pixels=None,
                  latents=None, original_hw=[(80, 64), (64, 64)], crop_top_left=[(8, 0), (0, 0)],
                  target_hw=[(64, 64), (64, 64)])
    hidden, added = cache.lookup(batch.captions, batch)
    with torch.no_grad():
        want_hidden, want_added = encode_captions(models, batch.captions, device, None, batch, 150)
    torch.testing.assert_close(hidden, want_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(added["text_embeds"], want_added["text_embeds"], rtol=1e-5, atol=1e-6)
    assert added["time_ids"].tolist() == [[80, 64, 8, 0, 64, 64], [64, 64, 0, 0, 64, 64]]
    # A caption it was not given is still encoded (with a warning), not an error.
    odd, _ = cache.lookup(["a caption nobody listed"], Batch(**{**batch.__dict__, "indices": [0], "captions": ["x"],
                                                               "original_hw": [(64, 64)], "crop_top_left": [(0, 0)],
                                                               "target_hw": [(64, 64)], "flipped": [False]}))
    assert odd.shape == (1, hidden.shape[1], hidden.shape[2]) and cache.misses == 1


def test_a_step_reads_nothing_back_from_the_device(make_config, tmp_path, monkeypatch):
    """No .item() / float() / .tolist() in the epoch loop but one per epoch: the GPU queue never drains mid-epoch."""
    from training import trainer

    inside = {"epoch": False}
    reads = []

    def watch(name):
        original = getattr(torch.Tensor, name)

        def patched(self, *args, **kwargs):
            if inside["epoch"]:
                reads.append(name)
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, patched)

    for name in ("item", "tolist", "__float__", "__bool__", "cpu", "numpy"):
        watch(name)

    def flagged(fn, value):
        def run(*args, **kwargs):
            before, inside["epoch"] = inside["epoch"], value
            try:
                return fn(*args, **kwargs)
            finally:
                inside["epoch"] = before
        return run

    # Watched: the whole epoch loop, except what is saved after a step (a checkpoint must read the weights).
    monkeypatch.setattr(trainer, "_train_epoch", flagged(trainer._train_epoch, True))
    monkeypatch.setattr(trainer, "_after_step", flagged(trainer._after_step, False))
    monkeypatch.delenv("LORA_SEARCH_EAGER", raising=False)
    # fused=True: the AdamW the trainer picks on CUDA (the CPU's default AdamW reads its step counters).
    cfg = _unet_only(make_config, tmp_path, "syncs", max_train_epochs=2, gradient_accumulation_steps=2,
                     train_batch_size=1, mixed_precision="bf16", optimizer_args=["fused=True"])
    result = trainer.train(cfg)
    assert result.steps == 4
    assert reads == ["tolist", "tolist"]  # each epoch's losses, read once for its log line


def test_gradients_accumulated_in_own_buffers_train_the_same(make_config, tmp_path, monkeypatch):
    """Under CUDA graphs with gradient accumulation the trainer keeps .grad in buffers of its own (a graph's
    output memory is reused by its next replay); that mode must train exactly as the usual one."""
    from training import trainer

    def config(out):
        return _unet_only(make_config, tmp_path, out, gradient_accumulation_steps=2, train_batch_size=1)

    usual = trainer.train(config("usual"))
    setup, step = trainer._setup_fast, trainer._apply_gradients
    first_grads = []

    def with_buffers(run, *args, **kwargs):
        setup(run, *args, **kwargs)
        run.grad_buffers = True

    def recording(run, params):
        if not first_grads:
            first_grads.extend(p.grad for p in params)  # held here, so no later tensor can take their place
        assert all(p.grad is g for p, g in zip(params, first_grads))
        step(run, params)

    monkeypatch.setattr(trainer, "_setup_fast", with_buffers)
    monkeypatch.setattr(trainer, "_apply_gradients", recording)
    buffered = trainer.train(config("buffered"))
    assert buffered.steps == usual.steps == 4
    assert len(first_grads) > 0  # the same gradient tensors at every step (checked in recording)
    _assert_close_weights(buffered.checkpoint, usual.checkpoint, 0)
