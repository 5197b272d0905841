"""Fit a training config to its dataset: the dataset report, the step budget and the auto-steps rule.

Definitions (the numbers ``lora-search plan`` prints):

- examples per epoch ``E`` = sum over folders of images x repeats (kohya's ``N_name`` folders).
- batches per epoch = per bucket ``ceil(examples in bucket / train_batch_size)``, summed
  (:func:`training.data.count_batches`; a batch never mixes bucket sizes). Without buckets this is
  ``ceil(E / train_batch_size)``.
- optimizer steps per epoch = ``ceil(batches per epoch / gradient_accumulation_steps)``, as sd-scripts
  computes it; total steps = steps per epoch x epochs, or ``max_train_steps`` when no epochs are set.
- steps per image = total optimizer steps / E (seed 004's measure: "1720 steps / (43 images x 10
  repeats) = 4 steps per image"). 30-60 is the range its guide recommends; outside it we warn with a fix.
  With repeats 1 it is simply optimizer steps per image. For scale we also print views per image =
  total steps x batch x accumulation / unique images (how often the model sees each picture).
- auto-steps (seed 004): ``max_train_steps = clamp(40 x unique images, 500, 3500)`` with repeats 1, and a
  checkpoint every 100 / 250 / 500 steps for runs under 1000 / 1000-2000 / over 2000 steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from training.buckets import Size
from training.config import TrainingConfig
from training.data import DataOptions, ImageItem, TrainDataset, scan_dataset

STEPS_PER_IMAGE_RANGE = (30.0, 60.0)
AUTO_STEPS_PER_IMAGE = 40
AUTO_STEPS_RANGE = (500, 3500)
DEFAULT_EPOCH_CHOICES = (12, 16, 20, 24)  # the default search space's max_train_epochs choices


# --------------------------------------------------------------------------- dataset report


@dataclass(frozen=True)
class FolderReport:
    """One ``N_name`` folder: its repeats, class tokens and caption coverage."""

    name: str
    repeats: int
    class_tokens: str
    images: int
    captions_missing: int


@dataclass(frozen=True)
class DatasetReport:
    """What the trainer will see in a dataset folder under a config's resolution and bucket settings."""

    root: Path
    folders: list[FolderReport]
    resolutions: Counter  # original (width, height) -> images
    buckets: Counter  # bucket (width, height) -> images
    batches_per_epoch: int
    batch_size: int

    @property
    def images(self) -> int:
        """Unique images."""
        return sum(f.images for f in self.folders)

    @property
    def examples_per_epoch(self) -> int:
        """Images x repeats, summed over folders."""
        return sum(f.images * f.repeats for f in self.folders)

    @property
    def trigger_tokens(self) -> list[str]:
        """The folders' class tokens (the captions of uncaptioned images), in folder order, once each."""
        return list(dict.fromkeys(f.class_tokens for f in self.folders if f.class_tokens))


def _folder_reports(items: Sequence[ImageItem]) -> list[FolderReport]:
    groups: dict[Path, list[ImageItem]] = {}
    for item in items:
        groups.setdefault(item.path.parent, []).append(item)
    return [FolderReport(name=folder.name, repeats=group[0].repeats, class_tokens=group[0].class_tokens,
                         images=len(group), captions_missing=sum(i.caption_missing for i in group))
            for folder, group in groups.items()]


def dataset_report(cfg: TrainingConfig, data_dir: Optional[str | Path] = None) -> DatasetReport:
    """Scan ``data_dir`` (default ``cfg.train_data_dir``) and bucket it as ``cfg`` would train it.

    Raises :class:`training.data.DatasetError` for a missing folder, an empty dataset or an unreadable image.
    """
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, train_data_dir=str(data_dir))
    items = scan_dataset(cfg.train_data_dir, cfg.caption_extension)
    dataset = TrainDataset(items, DataOptions.from_config(cfg))
    return DatasetReport(root=Path(cfg.train_data_dir), folders=_folder_reports(items),
                         resolutions=Counter((i.width, i.height) for i in items),
                         buckets=Counter(tuple(b) for b in dataset.buckets),
                         batches_per_epoch=dataset.batches_per_epoch(cfg.train_batch_size),
                         batch_size=cfg.train_batch_size)


# --------------------------------------------------------------------------- step budget


def steps_per_epoch(batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one epoch: ``ceil(batches / accumulation)`` (the last partial group still steps)."""
    return math.ceil(batches_per_epoch / gradient_accumulation_steps)


def steps_per_image(total_steps: int, examples_per_epoch: int) -> float:
    """Seed 004's measure: total optimizer steps / (images x repeats)."""
    return total_steps / examples_per_epoch


@dataclass(frozen=True)
class StepBudget:
    """The training length one setting implies. ``epochs`` is None for a ``max_train_steps`` run."""

    epochs: Optional[int]
    steps: int
    steps_per_image: float
    views_per_image: float

    @property
    def in_range(self) -> bool:
        low, high = STEPS_PER_IMAGE_RANGE
        return low <= self.steps_per_image <= high


def _budget(report: DatasetReport, cfg: TrainingConfig, epochs: Optional[int], steps: int) -> StepBudget:
    views = steps * cfg.train_batch_size * cfg.gradient_accumulation_steps / report.images
    return StepBudget(epochs, steps, steps_per_image(steps, report.examples_per_epoch), views)


def config_budget(report: DatasetReport, cfg: TrainingConfig) -> StepBudget:
    """The budget of ``cfg`` as written: its ``max_train_epochs``, else its ``max_train_steps``."""
    if cfg.max_train_epochs is None:
        return _budget(report, cfg, None, cfg.max_train_steps)
    per_epoch = steps_per_epoch(report.batches_per_epoch, cfg.gradient_accumulation_steps)
    return _budget(report, cfg, cfg.max_train_epochs, per_epoch * cfg.max_train_epochs)


def epoch_budgets(report: DatasetReport, cfg: TrainingConfig,
                  epoch_choices: Iterable[int] = DEFAULT_EPOCH_CHOICES) -> list[StepBudget]:
    """One budget per candidate epoch count (the config's own ``max_train_epochs`` included), ascending."""
    choices = set(epoch_choices) | ({cfg.max_train_epochs} if cfg.max_train_epochs else set())
    per_epoch = steps_per_epoch(report.batches_per_epoch, cfg.gradient_accumulation_steps)
    return [_budget(report, cfg, e, per_epoch * e) for e in sorted(choices)]


def _epochs_for(target: float, report: DatasetReport, cfg: TrainingConfig) -> int:
    per_epoch = steps_per_epoch(report.batches_per_epoch, cfg.gradient_accumulation_steps)
    return max(1, round(target * report.examples_per_epoch / per_epoch))


def budget_warning(budget: StepBudget, report: DatasetReport, cfg: TrainingConfig) -> Optional[str]:
    """A one-line warning with the fix when steps per image fall outside 30-60; None inside it."""
    if budget.in_range:
        return None
    low, high = STEPS_PER_IMAGE_RANGE
    spi = budget.steps_per_image
    problem = (f"{spi:.1f} steps per image is below {low:g}: the LoRA will barely learn" if spi < low else
               f"{spi:.1f} steps per image is above {high:g}: the LoRA will likely overfit")
    target_steps = AUTO_STEPS_PER_IMAGE * report.examples_per_epoch
    if budget.epochs is not None:
        # per epoch, steps per image is about 1 / (batch x accumulation) whatever the repeats
        return (f"{problem}; fix: set max_train_epochs = {_epochs_for(AUTO_STEPS_PER_IMAGE, report, cfg)} "
                f"at batch {cfg.train_batch_size} x accumulation {cfg.gradient_accumulation_steps}, "
                "or use --auto-steps")
    fix = f"set max_train_steps = {target_steps} ({AUTO_STEPS_PER_IMAGE} per image)"
    if spi < low and report.examples_per_epoch > report.images:
        fix += (f", or rename the folders to 1_<name> (repeats 1) and set max_train_steps = "
                f"{AUTO_STEPS_PER_IMAGE * report.images}")
    return f"{problem}; fix: {fix}"


# --------------------------------------------------------------------------- auto-steps (seed 004)


def checkpoint_interval(total_steps: int) -> int:
    """Steps between checkpoints: 100 under 1000 steps, 250 up to 2000, 500 above."""
    if total_steps < 1000:
        return 100
    return 250 if total_steps <= 2000 else 500


@dataclass(frozen=True)
class AutoSteps:
    """The seed-004 rule's result for a dataset of ``images`` unique images."""

    images: int
    max_train_steps: int
    save_every_n_steps: int

    @property
    def clamped(self) -> bool:
        return self.max_train_steps != self.images * AUTO_STEPS_PER_IMAGE


def auto_steps(images: int) -> AutoSteps:
    """``max_train_steps = clamp(40 x images, 500, 3500)`` and its checkpoint interval."""
    if images < 1:
        raise ValueError("auto_steps needs at least one image")
    low, high = AUTO_STEPS_RANGE
    steps = min(high, max(low, images * AUTO_STEPS_PER_IMAGE))
    return AutoSteps(images, steps, checkpoint_interval(steps))


# Keys the auto-steps run must not keep: epochs would override max_train_steps, and per-epoch saving or
# sampling would not line up with the step checkpoints the evaluator scores.
_EPOCH_KEYS = ("max_train_epochs", "save_every_n_epochs", "sample_every_n_epochs")


def apply_auto_steps(values: dict[str, Any], images: int) -> dict[str, Any]:
    """Flat kohya config values with the seed-004 step budget applied (a new dict).

    Sets ``max_train_steps`` and ``save_every_n_steps``; ``sample_every_n_steps`` too when the config
    samples; removes the per-epoch keys in ``_EPOCH_KEYS``.
    """
    rule = auto_steps(images)
    out = {key: value for key, value in values.items() if key not in _EPOCH_KEYS}
    out["max_train_steps"] = rule.max_train_steps
    out["save_every_n_steps"] = rule.save_every_n_steps
    if values.get("sample_prompts") or values.get("sample_every_n_epochs") or values.get("sample_every_n_steps"):
        out["sample_every_n_steps"] = rule.save_every_n_steps
    return out


# --------------------------------------------------------------------------- text


def _size(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def _top(counter: Counter, limit: int = 6) -> str:
    shown = ", ".join(f"{_size(size)} ({n})" for size, n in counter.most_common(limit))
    more = len(counter) - limit
    return shown + (f", and {more} more" if more > 0 else "")


def format_dataset_report(report: DatasetReport) -> list[str]:
    """The report as printable lines."""
    lines = [f"dataset {report.root}: {report.images} images in {len(report.folders)} folder(s), "
             f"{report.examples_per_epoch} examples per epoch (images x repeats)"]
    for f in report.folders:
        captions = f"{f.images - f.captions_missing} captioned"
        if f.captions_missing:
            captions += f", {f.captions_missing} missing (they train on the class tokens)"
        lines.append(f"  {f.name}: {f.images} images x {f.repeats} repeats, class tokens "
                     f"{f.class_tokens!r}, {captions}")
    tokens = ", ".join(repr(t) for t in report.trigger_tokens) or "none (folders have no class tokens)"
    lines += [f"trigger tokens: {tokens}",
              f"resolutions: {_top(report.resolutions)}",
              f"buckets: {_top(report.buckets)}; {report.batches_per_epoch} batches per epoch at batch "
              f"{report.batch_size}"]
    return lines


def format_budget(budget: StepBudget, marker: str = "") -> str:
    """One table row: epochs, steps, steps per image, views per image, range flag."""
    epochs = "steps" if budget.epochs is None else f"{budget.epochs:>5}"
    flag = "ok" if budget.in_range else ("LOW" if budget.steps_per_image < STEPS_PER_IMAGE_RANGE[0] else "HIGH")
    return (f"  {epochs:>5} {budget.steps:>8} {budget.steps_per_image:>10.1f} {budget.views_per_image:>10.1f}"
            f"  {flag}{marker}")
