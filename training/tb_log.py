"""Training logs for TensorBoard (and W&B): the curves a user judges a run by.

Tag names are sd-scripts' own, so a TensorBoard layout made for kohya runs reads these too:

- per optimizer step (x = global step): ``loss/current`` (the step's loss, the mean of its
  gradient-accumulation batches), ``loss/average`` (the mean of the last epoch's worth of step losses,
  sd-scripts' moving average) and ``lr/unet``, ``lr/textencoder`` (each parameter group's learning rate);
- per epoch (x = epoch): ``loss/epoch_average`` and, from the study worker, ``score/total``,
  ``score/<component>`` and the contact sheet; the trainer adds its sample images as ``samples``.

Where: ``logging_dir`` itself (not a timestamped subfolder as sd-scripts makes), so one trial is one
TensorBoard run and a resumed run continues the same curves; the events after the state it resumed
from are purged. ``log_with`` is sd-scripts' switch: unset means TensorBoard when ``logging_dir`` is
set; ``"wandb"`` or ``"all"`` also log to Weights & Biases when the ``wandb`` package is installed and
starts; when it is missing or cannot start, one warning is logged and training goes on.

Losses live on the GPU until read; this log reads them every :data:`LOG_EVERY` steps and at the end of
an epoch, one wait for the GPU per batch of steps, never one per step. Learning rates are CPU numbers.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

# Optimizer steps between writes of the step losses (each write waits for the GPU once).
LOG_EVERY = 50
# Sample images per epoch shown in TensorBoard, as thumbnails of this many pixels on the long side.
MAX_SAMPLES, THUMBNAIL = 16, 256

_OPEN: dict[Path, "TrainingLog"] = {}  # logging_dir -> the log this process is writing there


def uses_tensorboard(cfg: Any) -> bool:
    """Whether a config logs to TensorBoard: ``logging_dir`` set and ``log_with`` unset, tensorboard or all."""
    return bool(cfg.logging_dir) and cfg.log_with in (None, "tensorboard", "all")


def lr_tag_names(trains_unet: bool, trains_text_encoder: bool) -> list[str]:
    """sd-scripts' ``lr/...`` names of the optimizer's groups, in the trainer's order (UNet first)."""
    return ["unet"] * trains_unet + ["textencoder"] * trains_text_encoder


def summary_writer(log_dir: str | Path, purge_step: Optional[int] = None) -> Any:
    """A TensorBoard event writer in ``log_dir`` (created)."""
    from torch.utils.tensorboard import SummaryWriter

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(str(log_dir), purge_step=purge_step)


def shared_writer(log_dir: str | Path) -> Any:
    """The event writer this process's trainer has open in ``log_dir``, else None.

    The study worker adds its scores through it, so a trial's events stay in one file at a time
    (TensorBoard follows only the newest file of a run while it is being written).
    """
    found = _OPEN.get(Path(log_dir).resolve())
    return found.writer if found is not None else None


class TrainingLog:
    """One run's TensorBoard writer (and W&B run), fed by the training loop."""

    def __init__(self, writer: Any, lr_names: Sequence[str], window: int, wandb_run: Any = None,
                 log_dir: Optional[Path] = None):
        self.writer, self.wandb, self.lr_names, self.log_dir = writer, wandb_run, list(lr_names), log_dir
        self._recent: deque[float] = deque(maxlen=max(1, window))  # for loss/average
        self._pending: list[tuple[int, list[float]]] = []  # (step, lrs) whose losses are not written yet
        self._last_step = 0  # W&B wants one rising step: epoch values go there at the epoch's last step

    def step(self, global_step: int, lrs: Sequence[float], losses: Any) -> None:
        """After an optimizer step: note its learning rates; every LOG_EVERY steps write the losses.

        ``losses`` is the epoch's :class:`training.fast.LossLog`, the step's loss its newest entry.
        """
        self._pending.append((global_step, [float(lr) for lr in lrs]))
        self._last_step = global_step
        if global_step % LOG_EVERY == 0:
            self._write_steps(losses.values())

    def end_epoch(self, epoch: int, epoch_losses: Sequence[float]) -> None:
        """Write the epoch's remaining step losses and its mean loss, and put them on disk."""
        self._write_steps(epoch_losses)
        if epoch_losses:
            mean = sum(epoch_losses) / len(epoch_losses)
            self._scalars({"loss/epoch_average": mean}, epoch, wandb_step=self._last_step, epoch=epoch)
        self.flush()

    def samples(self, epoch: int, paths: Sequence[Path]) -> None:
        """The epoch's sample images as thumbnails (the first MAX_SAMPLES)."""
        if self.writer is None or not paths:
            return
        import numpy as np

        for image in _thumbnails(paths[:MAX_SAMPLES]):
            self.writer.add_image("samples", np.asarray(image), epoch, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.log_dir is not None and _OPEN.get(self.log_dir) is self:
            del _OPEN[self.log_dir]
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            _finish_wandb(self.wandb)

    def _write_steps(self, epoch_losses: Sequence[float]) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        newest = list(epoch_losses)[-len(pending):]
        for (step, lrs), loss in zip(pending[len(pending) - len(newest):], newest):
            self._recent.append(loss)
            values = {"loss/current": loss, "loss/average": sum(self._recent) / len(self._recent)}
            values.update({f"lr/{name}": lr for name, lr in zip(self.lr_names, lrs)})
            self._scalars(values, step)

    def _scalars(self, values: dict[str, float], step: int, wandb_step: Optional[int] = None,
                 epoch: Optional[int] = None) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb is not None:
            extra = {"epoch": epoch} if epoch is not None else {}
            _wandb_log(self.wandb, {**values, **extra}, step if wandb_step is None else wandb_step)


def open_log(cfg: Any, *, lr_names: Sequence[str], window: int, resumed_at: int = 0) -> Optional[TrainingLog]:
    """The run's log as ``cfg`` asks for it, or None when it logs nowhere.

    ``resumed_at`` is the global step a resumed run continues from: TensorBoard drops the events a
    crashed run wrote after it, so the curve has one point per step.
    """
    writer = None
    log_dir = Path(cfg.logging_dir).resolve() if cfg.logging_dir else None
    if uses_tensorboard(cfg):
        writer = summary_writer(log_dir, purge_step=resumed_at + 1 if resumed_at else None)
    wandb_run = _start_wandb(cfg) if cfg.log_with in ("wandb", "all") else None
    if writer is None and wandb_run is None:
        return None
    opened = TrainingLog(writer, lr_names, window, wandb_run, log_dir if writer is not None else None)
    if writer is not None:
        _OPEN[log_dir] = opened
        log.info("TensorBoard log in %s", log_dir)
    return opened


def _thumbnails(paths: Sequence[Path]) -> list[Any]:
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            images.append(image)
    return images


# --- Weights & Biases (optional: never required, never blocking) ---------------------------------------

def _start_wandb(cfg: Any) -> Any:
    """A W&B run, or None with one warning when wandb is missing or cannot start (e.g. no network)."""
    try:
        import wandb
    except ImportError:
        log.warning('log_with = "%s" but the wandb package is not installed (pip install wandb); logging to '
                    "TensorBoard only", cfg.log_with)
        return None
    try:
        return wandb.init(project=cfg.log_tracker_name or "lora-search", name=cfg.wandb_run_name or cfg.output_name,
                          dir=cfg.logging_dir or cfg.output_dir, config=cfg.to_dict())
    except Exception as exc:  # wandb raises many kinds (network, login, settings); none may stop training
        log.warning("W&B did not start (%s); training goes on without it (WANDB_MODE=offline logs locally)",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def _wandb_log(run: Any, values: dict, step: int) -> None:
    try:
        run.log(values, step=step)
    except Exception as exc:
        log.warning("W&B log failed (%s); continuing", exc)


def _finish_wandb(run: Any) -> None:
    try:
        run.finish()
    except Exception as exc:
        log.warning("W&B finish failed (%s)", exc)
