"""Checkpoint scorers: turn one saved epoch into the number the study maximizes.

``clip`` is the built-in CLIP-weighted evaluator (evaluation/); ``command`` runs a user's own script,
for people with an evaluation of their own: it must print the score as the last line of its output.
"""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from search.errors import TrainingFailed


@dataclass
class EpochScore:
    epoch: int
    total: float
    components: dict[str, float] = field(default_factory=dict)
    images: list[Path] = field(default_factory=list)  # contact sheets etc., uploaded as artifacts


class CheckpointScorer(ABC):
    @abstractmethod
    def score(self, run_dir: Path, config_path: Path, epoch: int, checkpoint: Path) -> EpochScore:
        """Score one epoch's checkpoint of the run in ``run_dir``."""


class CommandScorer(CheckpointScorer):
    """Runs ``command`` with {checkpoint}, {epoch}, {run_dir}, {config} filled in; reads the last line."""

    def __init__(self, command: list[str], timeout: Optional[float] = None):
        self.command = command
        self.timeout = timeout

    def score(self, run_dir: Path, config_path: Path, epoch: int, checkpoint: Path) -> EpochScore:
        argv = [p.format(checkpoint=checkpoint, epoch=epoch, run_dir=run_dir, config=config_path)
                for p in self.command]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout, cwd=Path.cwd())
        except OSError as exc:
            raise TrainingFailed(f"cannot run scorer {argv[0]!r} ({exc.strerror}); fix [scorer] command") from None
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise TrainingFailed(f"scorer {argv[0]!r} failed on epoch {epoch} (exit {done.returncode}): {tail}")
        try:
            value = float(lines[-1].split()[-1])
        except ValueError:
            raise TrainingFailed(f"scorer {argv[0]!r} printed {lines[-1]!r} last; it must print the score "
                                 "as the last line") from None
        return EpochScore(epoch=epoch, total=value)


class ClipScorer(CheckpointScorer):
    """The built-in CLIP-weighted evaluator; one instance keeps CLIP and reference embeddings loaded.

    An epoch saved without samples (a kohya run, or save and sample intervals that differ), or with only
    some of them (a run killed while it sampled), is sampled from its checkpoint first, by :func:`evaluation.sample_checkpoint` as ``lora-search evaluate`` does.
    Each scored epoch updates the run's ``scores.json``, keeping the entries already there (steps too).
    """

    def __init__(self, evaluator_config: Path):
        from evaluation import Evaluator, load_settings

        self.settings = load_settings(evaluator_config)
        self.evaluator = Evaluator(self.settings)
        self.history: dict[Path, dict[str, object]] = {}  # run folder -> entry label -> evaluation score

    def score(self, run_dir: Path, config_path: Path, epoch: int, checkpoint: Path) -> EpochScore:
        from evaluation import RunLayout, SavePoint, read_scores, sample_checkpoint, write_scores
        from evaluation.generate import samples_complete
        from training.config import load_training_config

        layout = RunLayout(Path(run_dir), load_training_config(config_path))
        if not samples_complete(layout, SavePoint(epoch)):
            sample_checkpoint(layout, SavePoint(epoch), checkpoint)
        result = self.evaluator.score_epoch(run_dir, epoch)
        if Path(run_dir) not in self.history:  # a retry keeps the entries its crashed run scored
            self.history[Path(run_dir)] = {e.label: e for e in read_scores(run_dir)}
        scored = self.history[Path(run_dir)]
        scored[result.label] = result
        write_scores(run_dir, list(scored.values()), self.settings)
        images = [result.contact_sheet] if result.contact_sheet else []
        return EpochScore(epoch=epoch, total=result.total, components=dict(result.components), images=images)


def make_scorer(settings) -> CheckpointScorer:
    if settings.scorer.type == "command":
        return CommandScorer(settings.scorer.command)
    return ClipScorer(Path(settings.study.evaluator_config))
