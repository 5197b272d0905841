"""Backend running lora-search's own trainer in-process (training.train)."""

from __future__ import annotations

from pathlib import Path

from search.backends.base import CheckpointCallback, TrainerBackend
from training.config import TrainingConfig


class BuiltinBackend(TrainerBackend):
    def train(self, config_path: Path, cfg: TrainingConfig, on_checkpoint: CheckpointCallback,
              resume: bool = False) -> None:
        from training import train

        def on_epoch_end(end) -> None:
            if end.checkpoint is not None:
                on_checkpoint(end.epoch, Path(end.checkpoint))

        train(cfg, resume=resume, on_epoch_end=on_epoch_end)
