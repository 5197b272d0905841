"""The CLIP-weighted checkpoint evaluator and the dataset check (open_clip, local weights only).

Public API::

    settings = load_settings()                      # configs/evaluator.toml, strict
    evaluator = Evaluator(settings)                 # loads CLIP once, caches reference/style embeddings
    score = evaluator.score_epoch(run_dir, epoch)   # EpochScore: total, components, images, contact_sheet
    score = evaluator.score_step(run_dir, step)     # the same for a save_every_n_steps checkpoint
    scores = evaluate_run(run_dir, settings)        # every sampled epoch and step; writes scores.json
    sample_checkpoint(layout, point, checkpoint)    # the one way a checkpoint without samples gets them
    report = verify_dataset(data_dir, refs, load_clip(settings.clip), threshold=0.75)

Names are imported on first use, so the CLI's option parsing does not pay for numpy and PIL.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClipModel": "evaluation.clip_loader",
    "load_clip": "evaluation.clip_loader",
    "EpochScore": "evaluation.evaluator",
    "Evaluator": "evaluation.evaluator",
    "ImageScore": "evaluation.evaluator",
    "RunScores": "evaluation.evaluator",
    "best_checkpoint": "evaluation.evaluator",
    "best_epoch": "evaluation.evaluator",
    "combine": "evaluation.evaluator",
    "evaluate_run": "evaluation.evaluator",
    "write_scores": "evaluation.evaluator",
    "read_scores": "evaluation.evaluator",
    "generate_missing_samples": "evaluation.generate",
    "sample_checkpoint": "evaluation.generate",
    "RunLayout": "evaluation.samples",
    "SavePoint": "evaluation.samples",
    "open_run": "evaluation.samples",
    "COMPONENTS": "evaluation.settings",
    "EvaluatorSettings": "evaluation.settings",
    "load_settings": "evaluation.settings",
    "settings_from_dict": "evaluation.settings",
    "ImageCheck": "evaluation.verify",
    "VerifyReport": "evaluation.verify",
    "verify_dataset": "evaluation.verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
