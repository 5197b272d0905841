"""Scoring a run's epochs: :class:`Evaluator` for one epoch, :func:`evaluate_run` for all of them.

The score of an epoch is the weighted sum of five components in 0..1 (weights from
``configs/evaluator.toml``). Each epoch also gets a contact sheet, ``contact_sheet_e{epoch:06d}.png``,
and :func:`evaluate_run` writes ``scores.json`` beside them.
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
from evaluation.samples import RunLayout, load_prompts, open_run
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
    """An epoch's weighted total, its five components in 0..1, their raw values and per-image details."""

    epoch: int
    total: float
    components: dict[str, float]
    raw: dict[str, float]
    images: list[ImageScore]
    contact_sheet: Path

    def to_json(self, run_dir: Path) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["contact_sheet"] = _relative(self.contact_sheet, run_dir)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], run_dir: Path) -> "EpochScore":
        """The inverse of :meth:`to_json`."""
        images = [ImageScore(**image) for image in data["images"]]
        return cls(epoch=data["epoch"], total=data["total"], components=data["components"], raw=data["raw"],
                   images=images, contact_sheet=Path(run_dir) / data["contact_sheet"])


@dataclass
class RunScores:
    """Every scored epoch of a run, the best one and where ``scores.json`` was written."""

    run_dir: Path
    epochs: list[EpochScore]
    best_epoch: int
    scores_path: Path
    generated_epochs: list[int] = field(default_factory=list)  # sampled here from their checkpoints

    @property
    def best(self) -> EpochScore:
        return next(e for e in self.epochs if e.epoch == self.best_epoch)


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
        layout = open_run(run_dir)
        trigger, prompts = load_prompts(layout)
        paths = layout.epoch_samples(epoch)
        if not paths:
            raise LoraSearchError(f"epoch {epoch} has no samples in {layout.sample_dir}; sample that epoch first")
        missing = sorted(set(paths) - set(prompts))
        if missing:
            raise LoraSearchError(f"{layout.sample_dir}/prompts.json has no prompt index {missing[0]}; re-run sampling")
        indices = sorted(paths)
        images = [open_rgb(paths[i]) for i in indices]
        texts = [strip_trigger(prompts[i].prompt, trigger) for i in indices]
        epoch_score = self._score_images(layout, [paths[i] for i in indices], indices, images, texts, epoch)
        self._write_sheet(epoch_score, images)
        return epoch_score

    def _score_images(self, layout: RunLayout, paths: list[Path], indices: list[int], images: list,
                      texts: list[str], epoch: int) -> EpochScore:
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
        return EpochScore(epoch=epoch, total=combine(scores, s), components=scores, raw=raw, images=per_image,
                          contact_sheet=layout.run_dir / f"contact_sheet_e{epoch:06d}.png")

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
        title = f"epoch {score.epoch}  total {score.total:.3f}  |  {parts}"
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


def write_scores(run_dir: Path, epochs: list[EpochScore], settings: EvaluatorSettings) -> RunScores:
    """Write ``{run_dir}/scores.json`` atomically for the given epoch scores; returns the summary."""
    run_dir = Path(run_dir)
    epochs = sorted(epochs, key=lambda e: e.epoch)
    best = best_epoch(epochs)
    data = {
        "best_epoch": best,
        "best_total": next(e.total for e in epochs if e.epoch == best),
        "weights": settings.weights.as_dict(),
        "clip_model": settings.clip.model,
        "epochs": [e.to_json(run_dir) for e in epochs],
    }
    path = atomic_write_text(run_dir / SCORES_FILE, json.dumps(data, indent=2) + "\n")
    return RunScores(run_dir=run_dir, epochs=epochs, best_epoch=best, scores_path=path)


def read_scores(run_dir: Path) -> list[EpochScore]:
    """The epochs a run's ``scores.json`` holds (none when it has no readable one)."""
    path = Path(run_dir) / SCORES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [EpochScore.from_json(epoch, Path(run_dir)) for epoch in data["epochs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def generate_missing_samples(layout: RunLayout) -> list[int]:
    """Sample every epoch that has a checkpoint but no images, with the run's prompt file; returns them.

    Nothing is generated when the run's config has no ``sample_prompts``.
    """
    checkpoints = layout.checkpoints()
    missing = sorted(set(checkpoints) - set(layout.sampled_epochs()))
    if not missing or not layout.config.sample_prompts:
        return []
    from training.sampling import generate_samples

    cfg = layout.config
    model = cfg.pretrained_model_name_or_path
    cfg = dataclasses.replace(  # samples belong in this run folder, wherever the run was trained
        cfg, output_dir=str(layout.run_dir), sample_prompts=str(layout.resolve(cfg.sample_prompts)),
        pretrained_model_name_or_path=str(layout.resolve(model)) if model else model)
    for epoch in missing:
        generate_samples(cfg, checkpoints[epoch], epoch)
    return missing


def evaluate_run(run_dir: Path, settings: EvaluatorSettings, evaluator: Optional[Evaluator] = None,
                 generate_missing: bool = True) -> RunScores:
    """Score every epoch of ``run_dir`` that has samples; writes contact sheets and ``scores.json``.

    With ``generate_missing``, epochs that have a checkpoint but no samples are sampled first.
    """
    layout = open_run(run_dir)
    generated = generate_missing_samples(layout) if generate_missing else []
    epochs = layout.sampled_epochs()
    if not epochs:
        raise LoraSearchError(f"{layout.run_dir} has no sample images in {layout.sample_dir} and no checkpoints "
                              "to sample; give a finished run (with sample_prompts set)")
    evaluator = evaluator or Evaluator(settings)
    scores = write_scores(layout.run_dir, [evaluator.score_epoch(layout.run_dir, e) for e in epochs], settings)
    scores.generated_epochs = generated
    return scores
