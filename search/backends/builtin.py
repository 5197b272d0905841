"""Backend running lora-search's own trainer in-process (training.train)."""

from __future__ import annotations

from pathlib import Path

from search.backends.base import EpochCallback, TrainerBackend
from training.config import TrainingConfig


class BuiltinBackend(TrainerBackend):
    """Every epoch is reported (the trainer has saved its checkpoint and state by then)."""

    def train(self, config_path: Path, cfg: TrainingConfig, on_epoch: EpochCallback, resume: bool = False) -> None:
        from training import train

        def on_epoch_end(end) -> None:
            on_epoch(end.epoch, Path(end.checkpoint) if end.checkpoint is not None else None)

        train(cfg, resume=resume, on_epoch_end=on_epoch_end)
