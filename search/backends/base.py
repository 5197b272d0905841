"""The trainer-backend interface: run one trial's training and announce each saved checkpoint."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Optional

from training.config import TrainingConfig

# on_epoch(epoch, checkpoint_path or None): called after each finished epoch the backend can see, with
# the epoch's checkpoint when one was saved (the worker then scores it and reports it to the trial).
# It may raise (optuna.TrialPruned when the pruner stops the trial, or a requested stop); the backend
# then stops training and re-raises.
EpochCallback = Callable[[int, Optional[Path]], None]


class TrainerBackend(ABC):
    """Trains one trial from its config file, calling ``on_epoch`` as epochs finish."""

    @abstractmethod
    def train(self, config_path: Path, cfg: TrainingConfig, on_epoch: EpochCallback,
              resume: bool = False) -> None:
        """Train to the end, or until ``on_epoch`` raises; failures raise TrainingFailed."""
