"""The run-folder layout the trainer writes, as the evaluator reads it.

* ``{run_dir}/config.toml``: the run's kohya-style training config;
* ``{run_dir}/sample/{output_name}_e{epoch:06d}_{index:02d}.png``: sample ``index`` of an epoch;
* ``{run_dir}/sample/{output_name}_s{step:08d}_{index:02d}.png``: sample ``index`` at optimizer step ``step``;
* ``{run_dir}/sample/prompts.json``: ``{"trigger": str|null, "prompts": [{"index", "prompt", ...}]}``;
* ``{run_dir}/{output_name}-{epoch:06d}.safetensors``: the epoch's LoRA checkpoint; the last epoch's is
  ``{run_dir}/{output_name}.safetensors``;
* ``{run_dir}/{output_name}-step{step:08d}.safetensors``: the LoRA checkpoint of optimizer step ``step``
  (``save_every_n_steps``), as sd-scripts names it.

A :class:`SavePoint` names one moment of training that has a checkpoint or samples: the end of an epoch,
or an optimizer step.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

from training.config import TrainingConfig, load_training_config
from training.errors import LoraSearchError

SAMPLE_DIR = "sample"
PROMPTS_FILE = "prompts.json"
DEFAULT_OUTPUT_NAME = "last"  # what sd-scripts names files when output_name is unset


@dataclass
class PromptInfo:
    """One entry of ``prompts.json``."""

    index: int
    prompt: str
    seed: Optional[int] = None


@dataclass(frozen=True)
class SavePoint:
    """The end of epoch ``epoch``, or, with ``step``, optimizer step ``step``.

    For a step, ``epoch`` counts the epochs completed before it (the ``ss_epoch`` sd-scripts and the
    built-in trainer record in a step checkpoint), so a step saved during epoch N+1 has ``epoch == N`` and
    sorts after the end of epoch N and before the end of epoch N+1.
    """

    epoch: int
    step: Optional[int] = None

    @property
    def label(self) -> str:
        """``"epoch 2"`` or ``"step 30"``: unique within a run, used in tables and ``scores.json``."""
        return f"epoch {self.epoch}" if self.step is None else f"step {self.step}"

    @property
    def tag(self) -> str:
        """The part of sample and contact-sheet file names that names this point: ``e000002``, ``s00000030``."""
        return f"e{self.epoch:06d}" if self.step is None else f"s{self.step:08d}"

    def sort_key(self) -> tuple[int, int, int]:
        """Training order: a step after the end of the epochs completed before it, then by step."""
        return (self.epoch, 0, 0) if self.step is None else (self.epoch, 1, self.step)


@dataclass
class RunLayout:
    """A run folder's config and the names of its files."""

    run_dir: Path
    config: TrainingConfig

    @property
    def output_name(self) -> str:
        return self.config.output_name or DEFAULT_OUTPUT_NAME

    @property
    def sample_dir(self) -> Path:
        return self.run_dir / SAMPLE_DIR

    def sample_path(self, epoch: int, index: int) -> Path:
        return self.sample_dir / f"{self.output_name}_e{epoch:06d}_{index:02d}.png"

    def sampled_epochs(self) -> list[int]:
        """Epochs that have at least one sample image, ascending."""
        return sorted({int(n) for n in self._sampled_numbers(r"e(\d{6})")})

    def sampled_steps(self) -> list[int]:
        """Optimizer steps that have at least one sample image, ascending."""
        return sorted({int(n) for n in self._sampled_numbers(r"s(\d{8})")})

    def _sampled_numbers(self, tag: str) -> list[str]:
        pattern = re.compile(re.escape(self.output_name) + "_" + tag + r"_(\d{2,})\.png$")
        return [m.group(1) for p in self.sample_dir.glob("*.png") if (m := pattern.match(p.name))]

    def sampled_points(self) -> list[SavePoint]:
        """Every epoch and step that has sample images, in training order."""
        points = [SavePoint(e) for e in self.sampled_epochs()] + [self.step_point(s) for s in self.sampled_steps()]
        return sorted(points, key=SavePoint.sort_key)

    def checkpoints(self) -> dict[int, Path]:
        """Epoch -> LoRA file: the numbered checkpoints, plus the final ``{output_name}.safetensors`` at the
        epoch its ``ss_epoch`` metadata records (else ``max_train_epochs``), as sd-scripts names the last one."""
        found = self._numbered_epoch_checkpoints()
        final = self.run_dir / f"{self.output_name}.safetensors"
        if final.is_file():
            epoch = _metadata_int(final, "ss_epoch") or self.config.max_train_epochs
            if epoch is not None:
                found.setdefault(epoch, final)
        return dict(sorted(found.items()))

    def _numbered_epoch_checkpoints(self) -> dict[int, Path]:
        pattern = re.compile(re.escape(self.output_name) + r"-(\d{6})\.safetensors$")
        return {int(m.group(1)): p for p in self.run_dir.glob("*.safetensors") if (m := pattern.match(p.name))}

    def step_checkpoints(self) -> dict[int, Path]:
        """Optimizer step -> LoRA file of the ``save_every_n_steps`` checkpoints, ascending."""
        pattern = re.compile(re.escape(self.output_name) + r"-step(\d{8})\.safetensors$")
        found = {int(m.group(1)): p for p in self.run_dir.glob("*.safetensors") if (m := pattern.match(p.name))}
        return dict(sorted(found.items()))

    def checkpoint_points(self) -> dict[SavePoint, Path]:
        """Every epoch and step checkpoint, keyed by its point, in training order."""
        found = {SavePoint(e): p for e, p in self.checkpoints().items()}
        found.update({self.step_point(s): p for s, p in self.step_checkpoints().items()})
        return dict(sorted(found.items(), key=lambda item: item[0].sort_key()))

    def checkpoint(self, point: SavePoint) -> Optional[Path]:
        """The LoRA file saved at ``point``, if there is one."""
        if point.step is None:
            return self.checkpoints().get(point.epoch)
        return self.step_checkpoints().get(point.step)

    def step_point(self, step: int) -> SavePoint:
        """The point of optimizer ``step``, with the epochs completed before it: from the step checkpoint's
        ``ss_epoch``, else from the steps per epoch the epoch checkpoints record, else 0 (unknown)."""
        path = self.run_dir / f"{self.output_name}-step{step:08d}.safetensors"
        done = _metadata_int(path, "ss_epoch") if path.is_file() else None
        if done is None:
            done = (step - 1) // self._steps_per_epoch if self._steps_per_epoch else 0
        return SavePoint(done, step)

    @cached_property
    def _steps_per_epoch(self) -> Optional[int]:
        # A numbered epoch checkpoint ends a full epoch; the final one may end a run cut short by
        # max_train_steps, so it only gives an estimate.
        numbered = sorted(self._numbered_epoch_checkpoints().values())
        final = self.run_dir / f"{self.output_name}.safetensors"
        for path in [*numbered, *([final] if final.is_file() else [])]:
            steps, epochs = _metadata_int(path, "ss_steps"), _metadata_int(path, "ss_epoch")
            if steps and epochs:
                return math.ceil(steps / epochs)
        return None

    def epoch_samples(self, epoch: int) -> dict[int, Path]:
        """Prompt index -> sample image of one epoch."""
        return self.samples(SavePoint(epoch))

    def samples(self, point: SavePoint) -> dict[int, Path]:
        """Prompt index -> sample image of one epoch or step."""
        pattern = re.compile(re.escape(self.output_name) + rf"_{point.tag}_(\d{{2,}})\.png$")
        return {int(m.group(1)): p for p in sorted(self.sample_dir.glob("*.png")) if (m := pattern.match(p.name))}

    def resolve(self, path: str) -> Path:
        """A path from the config: as written if it exists (relative to where lora-search runs), else
        relative to the run folder."""
        candidate = Path(path).expanduser()
        if candidate.is_absolute() or candidate.exists():
            return candidate
        return self.run_dir / candidate


def _metadata_int(path: Path, key: str) -> Optional[int]:
    """An integer ``ss_*`` value a kohya-format LoRA file records in its metadata, if any."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            value = (handle.metadata() or {}).get(key)
        return int(value) if value is not None else None
    except (OSError, ValueError, RuntimeError, SafetensorError):  # unreadable or odd: the caller falls back
        return None


def open_run(run_dir: str | Path) -> RunLayout:
    """Read a run folder's config; a missing folder or config is an error naming it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LoraSearchError(f"run folder {run_dir} not found; give the folder a training run wrote")
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise LoraSearchError(f"{run_dir} has no config.toml; give the folder a training run wrote")
    return RunLayout(run_dir=run_dir, config=load_training_config(config_path))


def load_prompts(layout: RunLayout) -> tuple[Optional[str], dict[int, PromptInfo]]:
    """The trigger and prompts from ``sample/prompts.json`` (trigger falls back to the config's)."""
    path = layout.sample_dir / PROMPTS_FILE
    if not path.is_file():
        raise LoraSearchError(f"{path} not found; the trainer writes it with the samples: re-run sampling")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        prompts = {int(p["index"]): PromptInfo(int(p["index"]), str(p["prompt"]), p.get("seed"))
                   for p in data["prompts"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise LoraSearchError(f"{path} is not a valid prompts file ({exc}); re-run sampling") from None
    trigger = data.get("trigger") or layout.config.metadata_trigger_phrase
    return trigger, prompts
