"""TensorBoard logs of the built-in trainer: kohya's tag names, read back with TensorBoard's own reader."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest

from training import tb_log
from training.errors import ConfigError


def read_events(log_dir: Path):
    """What TensorBoard shows for the run in ``log_dir``: its own event reader, every event kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_training_writes_per_step_loss_and_lr_and_per_epoch_loss(tmp_path, make_config):
    from training import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 64 --h 64 --s 2 --d 1\n")
    logs = tmp_path / "logs"
    # 2 images x 3 repeats at batch 1: 6 optimizer steps per epoch; warmup makes the LR move each step
    cfg = make_config(logging_dir=str(logs), train_batch_size=1, max_train_epochs=2, lr_scheduler="linear",
                      lr_warmup_steps=3, text_encoder_lr=5e-4, sample_prompts=str(prompts), sample_every_n_epochs=2)
    (Path(cfg.train_data_dir) / "1_ohwx cat").rename(Path(cfg.train_data_dir) / "3_ohwx cat")
    train(cfg)

    acc = read_events(logs)
    tags = set(acc.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder", "loss/epoch_average"} <= tags
    current = scalars(acc, "loss/current")
    assert [step for step, _ in current] == list(range(1, 13))  # every optimizer step, once
    unet_lr = dict(scalars(acc, "lr/unet"))
    assert unet_lr[1] < unet_lr[2] < unet_lr[3]  # the warmup is visible step by step
    assert unet_lr[12] < unet_lr[4]  # linear decay after it
    assert dict(scalars(acc, "lr/textencoder"))[3] == pytest.approx(5e-4 * unet_lr[3] / 1e-3)
    epoch_avg = dict(scalars(acc, "loss/epoch_average"))
    assert sorted(epoch_avg) == [1, 2]
    assert epoch_avg[2] == pytest.approx(sum(v for s, v in current[6:]) / 6, rel=1e-5)
    average = dict(scalars(acc, "loss/average"))  # kohya's moving average over the last epoch's steps
    assert average[12] == pytest.approx(epoch_avg[2], rel=1e-5)
    assert [e.step for e in acc.Images("samples")] == [2]  # the epoch's sample image


def test_unet_only_run_logs_one_lr_and_resume_keeps_one_point_per_step(tmp_path, make_config):
    from training import train

    class Stop(Exception):
        pass

    def stop_after_first(event):
        if event.epoch == 1:
            raise Stop

    logs = tmp_path / "logs"
    cfg = make_config(logging_dir=str(logs), network_train_unet_only=True, max_train_epochs=3, save_state=True)
    with pytest.raises(Stop):
        train(cfg, on_epoch_end=stop_after_first)
    train(cfg, resume=True)
    acc = read_events(logs)
    assert "lr/textencoder" not in acc.Tags()["scalars"]
    assert [s for s, _ in scalars(acc, "loss/current")] == [1, 2, 3]
    assert [s for s, _ in scalars(acc, "lr/unet")] == [1, 2, 3]


def test_no_logging_dir_writes_no_events(tmp_path, make_config):
    from training import train

    cfg = make_config(max_train_epochs=1)
    train(cfg)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_log_with_values(make_config):
    assert tb_log.uses_tensorboard(make_config(logging_dir="x"))  # kohya's default when logging_dir is set
    assert not tb_log.uses_tensorboard(make_config(logging_dir="x", log_with="wandb"))
    with pytest.raises(ConfigError, match="log_with = 'tensorboard'.*set logging_dir"):
        make_config(log_with="tensorboard")
    with pytest.raises(ConfigError, match="log_with = 'comet'.*use tensorboard, wandb, all"):
        make_config(log_with="comet", logging_dir="x")


def test_wandb_missing_or_failing_never_stops_training(tmp_path, make_config, monkeypatch, caplog):
    from training import train

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    cfg = make_config(logging_dir=str(tmp_path / "logs"), log_with="all", max_train_epochs=1)
    with caplog.at_level(logging.WARNING, logger="training"):
        train(cfg)
    assert "wandb package is not installed" in caplog.text
    assert scalars(read_events(tmp_path / "logs"), "loss/current")  # TensorBoard still got everything

    def offline(**kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=offline))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training"):
        train(make_config(log_with="wandb", wandb_run_name="r1", max_train_epochs=1,
                          output_dir=str(tmp_path / "out2")))
    assert "W&B did not start (network unreachable)" in caplog.text


def test_wandb_gets_kohya_tags_when_it_starts(tmp_path, make_config, monkeypatch):
    from training import train

    logged, started = [], {}

    class Run:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            started["finished"] = True

    def init(**kwargs):
        started.update(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    train(make_config(log_with="wandb", wandb_run_name="my-run", max_train_epochs=2))
    assert started["name"] == "my-run" and started["finished"]
    assert [step for step, values in logged if "loss/current" in values] == [1, 2]
    assert any(values.get("loss/epoch_average") is not None and values["epoch"] == 2 for _, values in logged)


class CountingLosses:
    """Stands in for the epoch's LossLog: counts the reads, each of which would wait for the GPU."""

    def __init__(self):
        self.steps, self.reads = [], 0

    def values(self):
        self.reads += 1
        return list(self.steps)


class Recorder:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step, value))

    def flush(self):
        pass


def test_losses_are_read_in_batches_and_every_step_is_logged_once(monkeypatch):
    monkeypatch.setattr(tb_log, "LOG_EVERY", 4)
    writer, losses = Recorder(), CountingLosses()
    log = tb_log.TrainingLog(writer, ["unet"], window=3)
    for step in range(1, 11):  # one epoch of 10 optimizer steps
        losses.steps.append(float(step))
        log.step(step, [0.1 * step], losses)
    assert losses.reads == 2  # at steps 4 and 8, not at every step
    log.end_epoch(1, losses.values())
    current = [(step, value) for tag, step, value in writer.scalars if tag == "loss/current"]
    assert current == [(s, float(s)) for s in range(1, 11)]
    average = {step: value for tag, step, value in writer.scalars if tag == "loss/average"}
    assert average[10] == pytest.approx((8 + 9 + 10) / 3)  # the window is the epoch's length
    assert [(s, v) for t, s, v in writer.scalars if t == "lr/unet"][3] == (4, pytest.approx(0.4))
    assert [(s, v) for t, s, v in writer.scalars if t == "loss/epoch_average"] == [(1, 5.5)]
