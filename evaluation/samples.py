"""The run-folder layout the trainer writes, as the evaluator reads it.

* ``{run_dir}/config.toml``: the run's kohya-style training config;
* ``{run_dir}/sample/{output_name}_e{epoch:06d}_{index:02d}.png``: sample ``index`` of an epoch;
* ``{run_dir}/sample/prompts.json``: ``{"trigger": str|null, "prompts": [{"index", "prompt", ...}]}``;
* ``{run_dir}/{output_name}-{epoch:06d}.safetensors``: the epoch's LoRA checkpoint; the last epoch's is
  ``{run_dir}/{output_name}.safetensors``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
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
        pattern = re.compile(re.escape(self.output_name) + r"_e(\d{6})_(\d{2,})\.png$")
        found = {int(m.group(1)) for p in self.sample_dir.glob("*.png") if (m := pattern.match(p.name))}
        return sorted(found)

    def checkpoints(self) -> dict[int, Path]:
        """Epoch -> LoRA file: the numbered checkpoints, plus the final ``{output_name}.safetensors`` at the
        epoch its ``ss_epoch`` metadata records (else ``max_train_epochs``), as sd-scripts names the last one."""
        pattern = re.compile(re.escape(self.output_name) + r"-(\d{6})\.safetensors$")
        found = {int(m.group(1)): p for p in self.run_dir.glob("*.safetensors") if (m := pattern.match(p.name))}
        final = self.run_dir / f"{self.output_name}.safetensors"
        if final.is_file():
            epoch = _recorded_epoch(final) or self.config.max_train_epochs
            if epoch is not None:
                found.setdefault(epoch, final)
        return dict(sorted(found.items()))

    def epoch_samples(self, epoch: int) -> dict[int, Path]:
        """Prompt index -> sample image of one epoch."""
        pattern = re.compile(re.escape(self.output_name) + rf"_e{epoch:06d}_(\d{{2,}})\.png$")
        return {int(m.group(1)): p for p in sorted(self.sample_dir.glob("*.png")) if (m := pattern.match(p.name))}

    def resolve(self, path: str) -> Path:
        """A path from the config: as written if it exists (relative to where lora-search runs), else
        relative to the run folder."""
        candidate = Path(path).expanduser()
        if candidate.is_absolute() or candidate.exists():
            return candidate
        return self.run_dir / candidate


def _recorded_epoch(path: Path) -> Optional[int]:
    """The ``ss_epoch`` a kohya-format LoRA file records in its metadata, if any."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            value = (handle.metadata() or {}).get("ss_epoch")
        return int(value) if value is not None else None
    except (OSError, ValueError, RuntimeError):  # unreadable file or odd metadata: fall back to the config
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
