"""Step-based runs: max_train_steps, save_every_n_steps, sample_every_n_steps, and resuming mid-epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import write_dataset


class Stop(Exception):
    """Raised from on_epoch_end, as a study pruning a trial (or a crash) would."""


def _steps_config(make_config, tmp_path: Path, out: str, workers: int = 0):
    # Three images at batch 1 with accumulation 2: batches 0-1 and 2 make the two steps of an epoch, so
    # step 3 ends mid-epoch (one batch of epoch 2 left) and step 5 cuts epoch 3 short.
    data = tmp_path / "data3"
    if not data.is_dir():
        write_dataset(data, images=3)
    return make_config(train_data_dir=str(data), output_dir=str(tmp_path / out), max_train_epochs=None,
                       max_train_steps=5, save_every_n_steps=3, train_batch_size=1, gradient_accumulation_steps=2,
                       network_dropout=0.1, noise_offset=0.1, flip_aug=True, shuffle_caption=True,
                       lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2, lr_warmup_steps=1,
                       max_data_loader_n_workers=workers)


def _assert_same_weights(path_a: Path, path_b: Path) -> None:
    a, b = load_file(str(path_a)), load_file(str(path_b))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)


def test_run_resumed_from_a_mid_epoch_step_state_ends_with_the_same_weights(make_config, tmp_path):
    from training import train
    from training.state import latest_state, load_state

    straight_events = []
    straight = train(_steps_config(make_config, tmp_path, "straight"), on_epoch_end=straight_events.append)
    assert straight.steps == 5 and straight.epochs == 3
    assert [e.global_step for e in straight_events] == [2, 4, 5]  # the third epoch stops after one step
    assert sorted(p.name for p in (tmp_path / "straight").glob("*.safetensors")) == [
        "lora-step00000003.safetensors", "lora.safetensors"]
    with safe_open(str(tmp_path / "straight" / "lora-step00000003.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_steps"] == "3" and meta["ss_epoch"] == "1" and meta["ss_max_train_steps"] == "5"

    # Interrupted at the end of epoch 2 (step 4): the newest state is the one of step 3, mid-epoch 2.
    cfg = _steps_config(make_config, tmp_path, "resumed", workers=2)
    def stop_after_second(event):
        if event.epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, on_epoch_end=stop_after_second)
    state = latest_state(cfg.output_dir)
    assert state == tmp_path / "resumed" / "state" / "step-00000003"
    saved = load_state(state)
    assert (saved.epoch, saved.batch, saved.global_step) == (1, 2, 3)
    _assert_same_weights(tmp_path / "straight" / "lora-step00000003.safetensors",
                         tmp_path / "resumed" / "lora-step00000003.safetensors")

    events = []
    resumed = train(cfg, resume=True, on_epoch_end=events.append)
    assert [(e.epoch, e.global_step) for e in events] == [(2, 4), (3, 5)]  # the last batch of epoch 2, then 3
    assert resumed.steps == 5
    _assert_same_weights(straight.checkpoint, resumed.checkpoint)


def test_step_checkpoints_and_samples_are_named_by_step_and_the_last_step_writes_the_final_file(
        make_config, tmp_path):
    from training import train
    from training.state import complete_states

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("{trigger} a cat --w 64 --h 64 --s 2 --d 5\n")
    # Two images at batch 1: two steps per epoch; 3 steps end one step into epoch 2.
    cfg = make_config(max_train_epochs=None, max_train_steps=3, train_batch_size=1, save_every_n_steps=1,
                      sample_prompts=str(prompts), sample_every_n_steps=2, metadata_trigger_phrase="ohwx")
    events = []
    result = train(cfg, on_epoch_end=events.append)

    out = Path(cfg.output_dir)
    assert result.steps == 3 and result.epochs == 2 and [e.global_step for e in events] == [2, 3]
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "lora-step00000001.safetensors", "lora-step00000002.safetensors", "lora.safetensors"]
    assert sorted(p.name for p in (out / "sample").iterdir()) == ["lora_s00000002_00.png", "prompts.json"]
    assert json.loads((out / "sample" / "prompts.json").read_text())["prompts"][0]["prompt"] == "ohwx a cat"
    with safe_open(str(result.checkpoint), "pt") as fh:
        assert fh.metadata()["ss_steps"] == "3"
    # Step states are pruned with epoch states: the two newest are kept, the run's final one newest.
    assert [p.name for p in complete_states(out)] == ["step-00000002", "epoch-000002"]


def test_states_are_ordered_by_step_and_an_epoch_end_follows_a_mid_epoch_state_of_its_step(tmp_path):
    from training.state import TrainingState, complete_states, save_state

    def state(epoch: int, batch: int, step: int) -> TrainingState:
        return TrainingState(epoch=epoch, batch=batch, global_step=step, seed=1, lora={"w": torch.zeros(2)},
                             optimizer={}, scheduler={}, scaler=None, rng={}, config={})

    save_state(tmp_path, state(1, 0, 10))
    save_state(tmp_path, state(1, 4, 12))  # mid-epoch 2
    assert [p.name for p in complete_states(tmp_path)] == ["epoch-000001", "step-00000012"]
    save_state(tmp_path, state(2, 0, 12))  # epoch 2 ends at the same step
    assert [p.name for p in complete_states(tmp_path)] == ["step-00000012", "epoch-000002"]
