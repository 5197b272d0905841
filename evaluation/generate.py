"""Sampling saved checkpoints that have no sample images: the one path both ``evaluate`` and the study use.

Images are generated with the run's prompt file exactly as the trainer would have generated them at that
epoch or step (same names, seeds and ``sample/prompts.json``), into the run folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from training.config import TrainingConfig

from evaluation.samples import RunLayout, SavePoint


def sampling_config(layout: RunLayout) -> TrainingConfig:
    """The run's config with its output folder set to the run folder (wherever the run was trained) and its
    prompt file and base model resolved as :meth:`RunLayout.resolve` does."""
    cfg = layout.config
    model, prompts = cfg.pretrained_model_name_or_path, cfg.sample_prompts
    return dataclasses.replace(
        cfg, output_dir=str(layout.run_dir), sample_prompts=str(layout.resolve(prompts)) if prompts else prompts,
        pretrained_model_name_or_path=str(layout.resolve(model)) if model else model)


def sample_checkpoint(layout: RunLayout, point: SavePoint, checkpoint: Path) -> list[Path]:
    """Generate the sample images of ``point`` (an epoch or a step) from its LoRA file; returns their paths."""
    from training.sampling import generate_samples

    if point.step is None:
        return generate_samples(sampling_config(layout), checkpoint, point.epoch)
    # A step's images are named by the step alone; the epoch being trained is the one after those done.
    return generate_samples(sampling_config(layout), checkpoint, point.epoch + 1, step=point.step)


def samples_complete(layout: RunLayout, point: SavePoint) -> bool:
    """Whether ``point`` has an image for every prompt of the run's prompt file (a run killed while it
    sampled has only some)."""
    from training.sampling import load_prompts

    if not layout.config.sample_prompts:
        return bool(layout.samples(point))
    wanted = {prompt.index for prompt in load_prompts(sampling_config(layout))}
    return wanted <= set(layout.samples(point))


def generate_missing_samples(layout: RunLayout) -> list[SavePoint]:
    """Sample every epoch and step checkpoint whose images are missing or incomplete, in training order;
    returns those points.

    Nothing is generated when the run's config has no ``sample_prompts``.
    """
    if not layout.config.sample_prompts:
        return []
    missing = {p: path for p, path in layout.checkpoint_points().items() if not samples_complete(layout, p)}
    for point, path in missing.items():
        sample_checkpoint(layout, point, path)
    return list(missing)
