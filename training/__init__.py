"""The built-in kohya-style LoRA trainer: ``train(cfg)`` runs one training from a :class:`TrainingConfig`.

Names are re-exported lazily so that importing ``training.config`` (as ``lora-search check`` does)
never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainingConfig": "training.config", "load_training_config": "training.config",
    "ConfigError": "training.errors", "LoraSearchError": "training.errors",
    "EpochEnd": "training.trainer", "TrainResult": "training.trainer", "train": "training.trainer",
    "generate_samples": "training.sampling", "LoraNetwork": "training.network", "load_models": "training.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
