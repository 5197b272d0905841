"""Scoring a run's checkpoints: :class:`Evaluator` for one, :func:`evaluate_run` for all of them.

A run is scored at every epoch and every optimizer step that has sample images (a :class:`SavePoint`).
The score is the weighted sum of five components in 0..1 (weights from ``configs/evaluator.toml``). Each
point also gets a contact sheet, ``contact_sheet_e{epoch:06d}.png`` or ``contact_sheet_s{step:08d}.png``,
and :func:`evaluate_run` writes ``scores.json`` beside them:

* ``epochs``: the epoch entries, ascending, as they have always been (``epoch``, ``total``, ``components``,
  ``raw``, ``images``, ``contact_sheet``, plus ``step: null`` and ``checkpoint``);
* ``steps``: the step entries, ascending by step, with the same fields; ``step`` is the optimizer step and
  ``epoch`` the number of epochs completed before it (the ``ss_epoch`` its checkpoint records);
* ``checkpoints``: every entry in training order as ``{"label", "epoch", "step", "total", "checkpoint"}``;
  ``label`` (``"epoch 2"``, ``"step 30"``) is the key of an entry, unique within a run;
* ``best``: that summary of the best entry over epochs and steps (it may be a step checkpoint);
* ``best_epoch``, ``best_total``: the best epoch entry and its total (null when only steps were scored),
  for readers that only know epochs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from training.atomic import atomic_write_text
from training.errors import LoraSearchError
from training.prompts import strip_trigger

from evaluation import components as comp
from evaluation.clip_loader import ClipModel, load_clip
from evaluation.contact_sheet import write_contact_sheet
from evaluation.images import find_images, open_rgb
from evaluation.quality import technical_quality
from evaluation.generate import generate_missing_samples
from evaluation.samples import RunLayout, SavePoint, load_prompts, open_run
from evaluation.settings import COMPONENTS, EvaluatorSettings

SCORES_FILE = "scores.json"
# Components measured per image; pose variety is a property of the set, so per-image scores leave it out.
PER_IMAGE = ("identity", "style", "prompt_adherence", "technical")


@dataclass
class ImageScore:
    """One sample's measurements: raw cosines (identity, style, prompt adherence), technical quality in
    0..1, and ``score``: its normalized components weighted as in the total, leaving out pose variety
    (a property of the set only) and renormalizing the remaining weights."""

    index: int
    path: str
    prompt: str
    identity: float
    style: float
    prompt_adherence: float
    technical: float
    score: float
    technical_details: dict[str, float] = field(default_factory=dict)


@dataclass
class EpochScore:
    """The score of one epoch or, with ``step``, one optimizer step: the weighted total, the five
    components in 0..1, their raw values and per-image details. For a step, ``epoch`` counts the epochs
    completed before it (see :class:`SavePoint`). ``checkpoint`` is the LoRA file saved there, if any."""

    epoch: int
    total: float
    components: dict[str, float]
    raw: dict[str, float]
    images: list[ImageScore]
    contact_sheet: Path
    step: Optional[int] = None
    checkpoint: Optional[Path] = None

    @property
    def point(self) -> SavePoint:
        return SavePoint(self.epoch, self.step)

    @property
    def label(self) -> str:
        """``"epoch 2"`` or ``"step 30"``: the entry's key within its run."""
        return self.point.label

    def to_json(self, run_dir: Path) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["contact_sheet"] = _relative(self.contact_sheet, run_dir)
        data["checkpoint"] = _relative(self.checkpoint, run_dir) if self.checkpoint else None
        return data

    def summary(self, run_dir: Path) -> dict[str, Any]:
        """The entry's line in ``checkpoints`` and ``best`` of ``scores.json``."""
        return {"label": self.label, "epoch": self.epoch, "step": self.step, "total": self.total,
                "checkpoint": _relative(self.checkpoint, run_dir) if self.checkpoint else None}

    @classmethod
    def from_json(cls, data: dict[str, Any], run_dir: Path) -> "EpochScore":
        """The inverse of :meth:`to_json` (entries written before steps were scored read as epochs)."""
        images = [ImageScore(**image) for image in data["images"]]
        checkpoint = data.get("checkpoint")
        return cls(epoch=data["epoch"], total=data["total"], components=data["components"], raw=data["raw"],
                   images=images, contact_sheet=Path(run_dir) / data["contact_sheet"], step=data.get("step"),
                   checkpoint=Path(run_dir) / checkpoint if checkpoint else None)


@dataclass
class RunScores:
    """Every scored checkpoint of a run in training order, the best one and where ``scores.json`` was written."""

    run_dir: Path
    checkpoints: list[EpochScore]
    best: EpochScore  # over epochs and steps
    scores_path: Path
    generated: list[SavePoint] = field(default_factory=list)  # sampled here from their checkpoints

    @property
    def epochs(self) -> list[EpochScore]:
        """The epoch entries, ascending."""
        return [c for c in self.checkpoints if c.step is None]

    @property
    def steps(self) -> list[EpochScore]:
        """The step entries, ascending."""
        return [c for c in self.checkpoints if c.step is not None]

    @property
    def best_epoch(self) -> Optional[int]:
        """The best epoch entry's epoch (None when only steps were scored)."""
        return best_epoch(self.epochs) if self.epochs else None

    @property
    def generated_epochs(self) -> list[int]:
        return [p.epoch for p in self.generated if p.step is None]


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


class Evaluator:
    """Scores epochs of training runs; loads CLIP once and caches reference and style embeddings."""

    def __init__(self, settings: EvaluatorSettings, clip: Optional[ClipModel] = None) -> None:
        self.settings = settings
        self._clip = clip
        self._folder_embeddings: dict[Path, Any] = {}

    @property
    def clip(self) -> ClipModel:
        """The CLIP model, loaded on first use."""
        if self._clip is None:
            self._clip = load_clip(self.settings.clip)
        return self._clip

    def folder_embeddings(self, folder: Path, what: str, fix: str) -> Any:
        """Unit embeddings of every image under ``folder``, computed once per folder."""
        key = folder.resolve()
        if key not in self._folder_embeddings:
            paths = find_images(folder, what, fix)
            self._folder_embeddings[key] = self.clip.encode_images([open_rgb(p) for p in paths])
        return self._folder_embeddings[key]

    def reference_embeddings(self) -> Any:
        """Embeddings of the reference images (``references`` in the settings)."""
        return self.folder_embeddings(
            Path(self.settings.references).expanduser(), "reference folder",
            "put images of the character there, set references in configs/evaluator.toml or pass --references DIR")

    def style_embeddings(self, layout: RunLayout) -> Any:
        """Embeddings of the style images: ``style_references``, else the run's training images."""
        if self.settings.style_references:
            folder = Path(self.settings.style_references).expanduser()
            fix = "fix style_references in configs/evaluator.toml (empty uses the training images)"
        elif layout.config.train_data_dir:
            folder = layout.resolve(layout.config.train_data_dir)
            fix = "fix train_data_dir in the run's config.toml or set style_references in configs/evaluator.toml"
        else:
            raise LoraSearchError(f"{layout.run_dir}/config.toml has no train_data_dir; set style_references "
                                  "in configs/evaluator.toml")
        return self.folder_embeddings(folder, "style image folder", fix)

    def score_epoch(self, run_dir: Path, epoch: int) -> EpochScore:
        """Score one epoch's samples and write its contact sheet."""
        return self.score_point(run_dir, SavePoint(epoch))

    def score_step(self, run_dir: Path, step: int) -> EpochScore:
        """Score the samples of one optimizer step and write its contact sheet."""
        return self.score_point(run_dir, open_run(run_dir).step_point(step))

    def score_point(self, run_dir: Path, point: SavePoint) -> EpochScore:
        """Score the samples of one epoch or step and write its contact sheet."""
        layout = open_run(run_dir)
        trigger, prompts = load_prompts(layout)
        paths = layout.samples(point)
        if not paths:
            raise LoraSearchError(f"{point.label} has no samples in {layout.sample_dir}; sample that "
                                  f"{'epoch' if point.step is None else 'step'} first")
        missing = sorted(set(paths) - set(prompts))
        if missing:
            raise LoraSearchError(f"{layout.sample_dir}/prompts.json has no prompt index {missing[0]}; re-run sampling")
        indices = sorted(paths)
        images = [open_rgb(paths[i]) for i in indices]
        texts = [strip_trigger(prompts[i].prompt, trigger) for i in indices]
        score = self._score_images(layout, [paths[i] for i in indices], indices, images, texts, point)
        self._write_sheet(score, images)
        return score

    def _score_images(self, layout: RunLayout, paths: list[Path], indices: list[int], images: list,
                      texts: list[str], point: SavePoint) -> EpochScore:
        s, clip = self.settings, self.clip
        full = clip.encode_images(images)
        crops = clip.encode_images([comp.centre_crop(im, s.pose_variety.center_crop) for im in images])
        identity, id_raw = comp.identity(full, self.reference_embeddings(), s.identity)
        variety, variety_raw = comp.pose_variety(crops, texts, s.pose_variety)
        style, style_raw = comp.style(full, self.style_embeddings(layout), s.style)
        adherence, adh_raw = comp.prompt_adherence(full, clip.encode_texts(texts), s.prompt_adherence)
        technical = [technical_quality(im, s.technical) for im in images]
        scores = {"identity": identity, "pose_variety": variety, "style": style,
                  "prompt_adherence": adherence, "technical": sum(t for t, _ in technical) / len(technical)}
        raw = {"identity": sum(id_raw) / len(id_raw), "pose_variety": variety_raw,
               "style": sum(style_raw) / len(style_raw), "prompt_adherence": sum(adh_raw) / len(adh_raw),
               "technical": scores["technical"]}
        per_image = [self._image_score(i, paths[n], texts[n], id_raw[n], style_raw[n],
                                       adh_raw[n], technical[n]) for n, i in enumerate(indices)]
        return EpochScore(epoch=point.epoch, total=combine(scores, s), components=scores, raw=raw, images=per_image,
                          contact_sheet=layout.run_dir / f"contact_sheet_{point.tag}.png", step=point.step,
                          checkpoint=layout.checkpoint(point))

    def _image_score(self, index: int, path: Path, prompt: str, identity: float, style: float,
                     adherence: float, technical: tuple[float, dict]) -> ImageScore:
        s = self.settings
        normalized = {
            "identity": comp.normalize(identity, s.identity.low, s.identity.high),
            "style": comp.normalize(style, s.style.low, s.style.high),
            "prompt_adherence": comp.normalize(adherence, s.prompt_adherence.low, s.prompt_adherence.high),
            "technical": technical[0],
        }
        weights = {k: getattr(s.weights, k) for k in PER_IMAGE}
        weight_sum = sum(weights.values()) or 1.0
        score = sum(weights[k] * normalized[k] for k in PER_IMAGE) / weight_sum
        return ImageScore(index=index, path=path.name, prompt=prompt, identity=identity, style=style,
                          prompt_adherence=adherence, technical=technical[0], score=score,
                          technical_details=technical[1])

    def _write_sheet(self, score: EpochScore, images: list) -> None:
        labels = [f"#{im.index:02d}  score {im.score:.2f}" for im in score.images]
        parts = "  ".join(f"{name} {value:.2f}" for name, value in score.components.items())
        where = score.label if score.step is None else f"{score.label} (after epoch {score.epoch})"
        title = f"{where}  total {score.total:.3f}  |  {parts}"
        write_contact_sheet(score.contact_sheet, images, labels, title)


def combine(components: dict[str, float], settings: EvaluatorSettings) -> float:
    """The weighted total of the five components."""
    weights = settings.weights.as_dict()
    return sum(weights[name] * components[name] for name in COMPONENTS)


def best_epoch(epochs: list[EpochScore]) -> int:
    """The epoch with the highest total; on a tie the earlier epoch (less training, less overfitting)."""
    if not epochs:
        raise LoraSearchError("no epochs were scored; sample at least one epoch")
    return max(epochs, key=lambda e: (e.total, -e.epoch)).epoch


def best_checkpoint(scores: list[EpochScore]) -> EpochScore:
    """The entry (epoch or step) with the highest total; on a tie the earlier one in training order."""
    if not scores:
        raise LoraSearchError("no checkpoints were scored; sample at least one epoch")
    return max(training_order(scores), key=lambda e: e.total)  # max keeps the first of equal totals


def training_order(scores: list[EpochScore]) -> list[EpochScore]:
    """The entries sorted as training produced them (see :class:`SavePoint`)."""
    return sorted(scores, key=lambda e: e.point.sort_key())


def write_scores(run_dir: Path, scores: list[EpochScore], settings: EvaluatorSettings) -> RunScores:
    """Write ``{run_dir}/scores.json`` atomically for the given epoch and step scores; returns the summary."""
    run_dir = Path(run_dir)
    ordered = training_order(scores)
    best = best_checkpoint(ordered)
    epochs = [e for e in ordered if e.step is None]
    legacy_best = best_epoch(epochs) if epochs else None
    data = {
        "best_epoch": legacy_best,
        "best_total": next((e.total for e in epochs if e.epoch == legacy_best), None),
        "best": best.summary(run_dir),
        "weights": settings.weights.as_dict(),
        "clip_model": settings.clip.model,
        "checkpoints": [e.summary(run_dir) for e in ordered],
        "epochs": [e.to_json(run_dir) for e in epochs],
        "steps": [e.to_json(run_dir) for e in ordered if e.step is not None],
    }
    path = atomic_write_text(run_dir / SCORES_FILE, json.dumps(data, indent=2) + "\n")
    return RunScores(run_dir=run_dir, checkpoints=ordered, best=best, scores_path=path)


def read_scores(run_dir: Path) -> list[EpochScore]:
    """The epochs and steps a run's ``scores.json`` holds, in training order (none when it has no readable one)."""
    path = Path(run_dir) / SCORES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = [*data["epochs"], *data.get("steps", [])]
        return training_order([EpochScore.from_json(entry, Path(run_dir)) for entry in entries])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def evaluate_run(run_dir: Path, settings: EvaluatorSettings, evaluator: Optional[Evaluator] = None,
                 generate_missing: bool = True) -> RunScores:
    """Score every epoch and step of ``run_dir`` that has samples; writes contact sheets and ``scores.json``.

    With ``generate_missing``, epoch and step checkpoints that have no samples are sampled first.
    """
    layout = open_run(run_dir)
    generated = generate_missing_samples(layout) if generate_missing else []
    points = layout.sampled_points()
    if not points:
        raise LoraSearchError(f"{layout.run_dir} has no sample images in {layout.sample_dir} and no checkpoints "
                              "to sample; give a finished run (with sample_prompts set)")
    evaluator = evaluator or Evaluator(settings)
    scores = write_scores(layout.run_dir, [evaluator.score_point(layout.run_dir, p) for p in points], settings)
    scores.generated = generated
    return scores
