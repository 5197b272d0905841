"""The trainer-backend interface: run one trial's training and announce each saved checkpoint."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

from training.config import TrainingConfig

# on_checkpoint(epoch, checkpoint_path): scores the epoch and reports it to the trial. It may raise
# (optuna.TrialPruned when the pruner stops the trial); the backend then stops training and re-raises.
CheckpointCallback = Callable[[int, Path], None]


class TrainerBackend(ABC):
    """Trains one trial from its config file, calling ``on_checkpoint`` as each epoch is saved."""

    @abstractmethod
    def train(self, config_path: Path, cfg: TrainingConfig, on_checkpoint: CheckpointCallback,
              resume: bool = False) -> None:
        """Train to the end, or until ``on_checkpoint`` raises; failures raise TrainingFailed."""
