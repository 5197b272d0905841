"""Run-time fallback of the compiled step: a failure while compiling or running it costs the run nothing.

Failures are injected into the compiled callables (as a CUDA-graph replay, an inductor assert or an
8-bit optimizer rejecting a gradient would raise them on a GPU): in the forward, in the backward, in the
optimizer step, at the first step, at a later one, at the first step of a new bucket shape and between
the micro-batches of an accumulated step. The compiled runs use the ``aot_eager`` backend (AOTAutograd
traces forward and backward, no code generation), so they compute what the plain run computes and the
fallback run must end where a run that never compiled ends: same optimizer steps, same losses (1e-4
relative) and same LoRA weights (1e-5 absolute), i.e. no micro-batch counted twice or lost.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_dataset

LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-5


class Injected(RuntimeError):
    """The failure the tests plant in the compiled step."""


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        raise Injected("replayed CUDA graph output was overwritten (injected)")


def inject(monkeypatch, target: str, phase: str, when: Callable[[int, tuple], bool]) -> dict:
    """Make the compiled ``target`` ("eager": the UNet step, "encode_tokens": the text encoder) fail once in
    ``phase`` ("forward" or "backward") at the first call for which ``when(call_number, args)`` holds.

    Returns counters: ``calls`` of the compiled callable, and ``after`` (calls after the failure)."""
    real_compile = torch.compile
    record = {"calls": 0, "failed": False, "after": 0}

    def compile_(fn, **kwargs):
        compiled = real_compile(fn, **kwargs)
        if getattr(getattr(fn, "func", fn), "__name__", "") != target:
            return compiled

        def call(*args):
            record["calls"] += 1
            if record["failed"]:
                record["after"] += 1
            elif when(record["calls"], args):
                record["failed"] = True
                if phase == "forward":
                    raise Injected("inductor run-time assert in the compiled forward (injected)")
                return _FailInBackward.apply(compiled(*args))
            return compiled(*args)

        return call

    monkeypatch.setattr(torch, "compile", compile_)
    return record


def at_call(n: int) -> Callable[[int, tuple], bool]:
    return lambda calls, args: calls == n


def at_new_shape() -> Callable[[int, tuple], bool]:
    """The first call whose input shape differs from the first call's (a new bucket)."""
    first = []

    def when(calls, args):
        first.extend([] if first else [tuple(args[0].shape)])
        return tuple(args[0].shape) != first[0]

    return when


def _two_bucket_data(tmp_path: Path) -> Path:
    data = tmp_path / "buckets"
    if not data.is_dir():
        write_dataset(data, images=3, name="ohwx cat", size=(64, 64))
        write_dataset(data, images=3, name="ohwx dog", size=(64, 32))
    return data


def _config(make_config, tmp_path: Path, out: str, compile_: bool, **overrides):
    values = dict(train_data_dir=str(_two_bucket_data(tmp_path)), output_dir=str(tmp_path / out),
                  network_train_unet_only=True, max_train_epochs=2, train_batch_size=2, min_snr_gamma=5.0,
                  noise_offset=0.05, cache_latents=True, enable_bucket=True, bucket_no_upscale=True,
                  bucket_reso_steps=32, min_bucket_reso=32, torch_compile=compile_, dynamo_backend="aot_eager")
    return make_config(**{**values, **overrides})


def _train(cfg, **kwargs):
    from training import train

    events = []
    result = train(cfg, on_epoch_end=events.append, **kwargs)
    return result, [loss for e in events for loss in e.losses]


def _assert_same_run(a, a_losses, b, b_losses) -> None:
    assert a.steps == b.steps and len(a_losses) == len(b_losses)
    torch.testing.assert_close(torch.tensor(a_losses), torch.tensor(b_losses), rtol=LOSS_RTOL, atol=0)
    wa, wb = load_file(str(a.checkpoint)), load_file(str(b.checkpoint))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=WEIGHT_ATOL, msg=key)


def _fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "the compiled training step failed" in r.getMessage()]


SCENARIOS = {
    # name: (target, phase, when, config overrides, what the log line names)
    "forward at the first step": ("eager", "forward", at_call(1), {}, "forward (input "),
    "backward at a later step": ("eager", "backward", at_call(4), {}, "backward (input"),
    "first step of a new bucket shape": ("eager", "forward", at_new_shape(), {}, "forward (input"),
    "second micro-batch of an accumulated step": ("eager", "backward", at_call(4),
                                                  {"gradient_accumulation_steps": 2, "train_batch_size": 1},
                                                  "backward (input 1x4x"),
    "text encoder at a later step": ("encode_tokens", "forward", at_call(3),
                                     {"network_train_unet_only": False, "text_encoder_lr": 5e-4}, "forward"),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_failing_compiled_step_is_redone_uncompiled_and_the_run_ends_as_a_plain_run(
        name, make_config, tmp_path, monkeypatch, caplog):
    target, phase, when, overrides, where = SCENARIOS[name]
    monkeypatch.delenv("LORA_SEARCH_EAGER", raising=False)
    plain, plain_losses = _train(_config(make_config, tmp_path, "plain", False, **overrides))

    record = inject(monkeypatch, target, phase, when)
    caplog.set_level(logging.INFO, logger="training")
    fell_back, losses = _train(_config(make_config, tmp_path, "fallback", True, **overrides))

    lines = _fallback_lines(caplog)
    assert len(lines) == 1, lines
    assert f"failed in the {where}" in lines[0] and "Injected: " in lines[0] and "(injected)" in lines[0]
    assert record["failed"] and record["after"] == 0  # the rest of the run stayed uncompiled
    assert all(torch.isfinite(torch.tensor(losses)))
    _assert_same_run(fell_back, losses, plain, plain_losses)


def test_a_failing_optimizer_step_after_compiled_gradients_is_redone_uncompiled(make_config, tmp_path, monkeypatch,
                                                                                 caplog):
    """An optimizer that rejects the gradients the compiled step left (8-bit AdamW beside CUDA graphs)."""
    from training import trainer

    monkeypatch.delenv("LORA_SEARCH_EAGER", raising=False)
    plain, plain_losses = _train(_config(make_config, tmp_path, "plain", False, gradient_accumulation_steps=2,
                                         train_batch_size=1))
    original, failures = trainer._apply_gradients, []

    def rejecting(run, params):
        if run.global_step == 2 and trainer._compiled(run):
            failures.append(run.global_step)
            raise Injected("gradient is not a contiguous CUDA tensor (injected)")
        original(run, params)

    monkeypatch.setattr(trainer, "_apply_gradients", rejecting)
    caplog.set_level(logging.INFO, logger="training")
    fell_back, losses = _train(_config(make_config, tmp_path, "fallback", True, gradient_accumulation_steps=2,
                                       train_batch_size=1))
    assert failures == [2]
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "failed in the optimizer step at step 3" in lines[0]
    _assert_same_run(fell_back, losses, plain, plain_losses)


def test_running_out_of_memory_in_the_compiled_step_is_not_redone(make_config, tmp_path, monkeypatch):
    """Out of memory is a limit of the configuration: the run stops with it, as before (the study prunes it)."""
    from training import train

    monkeypatch.delenv("LORA_SEARCH_EAGER", raising=False)
    real_compile = torch.compile

    def compile_(fn, **kwargs):
        compiled = real_compile(fn, **kwargs)

        def call(*args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return call if getattr(fn, "__name__", "") == "eager" else compiled

    monkeypatch.setattr(torch, "compile", compile_)
    with pytest.raises(torch.OutOfMemoryError):
        train(_config(make_config, tmp_path, "oom", True))


def test_a_failing_compiler_falls_back_to_the_uncompiled_step(make_config, tmp_path, monkeypatch, caplog):
    """A backend that cannot compile at all (no C++ compiler, an unsupported GPU): one line, then plain training."""
    from training import fast

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": broken_backend}))
    monkeypatch.delenv("LORA_SEARCH_EAGER", raising=False)
    plain, plain_losses = _train(_config(make_config, tmp_path, "plain", False))
    caplog.set_level(logging.INFO, logger="training")
    built = []
    monkeypatch.setattr(fast, "UnetLoss", _recording(fast.UnetLoss, built))
    fell_back, losses = _train(_config(make_config, tmp_path, "fallback", True))
    lines = _fallback_lines(caplog)
    assert len(lines) == 1 and "forward" in lines[0] and "no C++ compiler found" in lines[0]
    assert not built[0].compiled
    _assert_same_run(fell_back, losses, plain, plain_losses)


def _recording(cls, built: list):
    def make(*args, **kwargs):
        built.append(cls(*args, **kwargs))
        return built[-1]
    return make


def test_a_run_that_fell_back_resumes_exactly(make_config, tmp_path, monkeypatch, caplog):
    """Stopped after a fallback in epoch 1 and resumed in a new (compiling) process: the same end as a straight run."""
    from training import train

    class Stop(Exception):
        pass

    monkeypatch.delenv("LORA_SEARCH_EAGER", raising=False)
    straight, straight_losses = _train(_config(make_config, tmp_path, "straight", False, max_train_epochs=3))
    cfg = _config(make_config, tmp_path, "resumed", True, max_train_epochs=3, save_state=True)

    def stop_after_first(event):
        if event.epoch == 1:
            raise Stop

    with monkeypatch.context() as mp:
        record = inject(mp, "eager", "backward", at_call(2))
        with pytest.raises(Stop):
            train(cfg, on_epoch_end=stop_after_first)
    assert record["failed"] and len(_fallback_lines(caplog)) == 1
    caplog.clear()
    caplog.set_level(logging.INFO, logger="training")
    resumed, losses = _train(cfg, resume=True)
    assert "UNet step compiled" in caplog.text and not _fallback_lines(caplog)  # the new process compiles again
    assert resumed.steps == straight.steps
    per_epoch = len(straight_losses) // 3
    _assert_same_run(resumed, losses, straight, straight_losses[per_epoch:])
