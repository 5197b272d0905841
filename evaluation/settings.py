"""Evaluator settings, read strictly from ``configs/evaluator.toml`` into dataclasses.

Every TOML table is one dataclass below; a key that is not a field is an error naming the nearest
valid key, and each value is type-checked and range-checked where the dataclass is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from training.config import read_toml
from training.errors import ConfigError

COMPONENTS = ("identity", "pose_variety", "style", "prompt_adherence", "technical")
DEFAULT_SETTINGS_PATH = Path("configs/evaluator.toml")
_PROJECT_SETTINGS_PATH = Path(__file__).resolve().parents[1] / "configs" / "evaluator.toml"


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _check_bounds(where: str, low: float, high: float) -> None:
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"{where}: low = {low} must be below high = {high}; fix the bounds")


@dataclass
class ClipSettings:
    """Which CLIP model to load and from where; nothing is ever downloaded."""

    model: str = _f("ViT-L-14-quickgelu", "open_clip model name, or local-dir:FOLDER")
    pretrained: str = _f("models/clip/ViT-L-14-openai.safetensors",
                         "local weights file, or a pretrained tag found in cache_dir")
    cache_dir: str = _f("", "populated open_clip / Hugging Face cache folder for pretrained tags")
    force_quick_gelu: bool = _f(False, "QuickGELU activations (OpenAI weights under a plain model name)")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    batch_size: int = _f(16, "images per CLIP forward pass")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"[clip] batch_size = {self.batch_size}: must be at least 1")
        if not self.model:
            raise ConfigError("[clip] model is empty: set an open_clip model name or local-dir:FOLDER")


@dataclass
class Weights:
    """How the five components combine into one score; non-negative and summing to 1."""

    identity: float = _f(0.40, "CLIP image similarity to the reference images")
    pose_variety: float = _f(0.20, "diversity among the samples")
    style: float = _f(0.20, "similarity to the training (or style) images' centroid")
    prompt_adherence: float = _f(0.10, "CLIP text-image similarity to the prompt")
    technical: float = _f(0.10, "sharpness, exposure, clipping, contrast, colorfulness")

    def __post_init__(self) -> None:
        values = self.as_dict()
        for name, value in values.items():
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"[weights] {name} = {value}: must be a number >= 0")
        total = sum(values.values())
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"[weights] sum to {total:.6g}, not 1; scale them so they add up to 1")

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in COMPONENTS}


@dataclass
class IdentitySettings:
    """Per sample: mean cosine to every reference, or the mean of its ``top_k`` best references."""

    aggregation: str = _f("mean", "mean or topk")
    top_k: int = _f(3, "references averaged per sample when aggregation = topk")
    low: float = _f(0.5, "raw cosine mapped to 0 (unrelated images of one domain sit near here)")
    high: float = _f(1.0, "raw cosine mapped to 1 (the sample equals the references)")

    def __post_init__(self) -> None:
        if self.aggregation not in ("mean", "topk"):
            raise ConfigError(f"[identity] aggregation = {self.aggregation!r}: use mean or topk")
        if self.top_k < 1:
            raise ConfigError(f"[identity] top_k = {self.top_k}: must be at least 1")
        _check_bounds("[identity]", self.low, self.high)


@dataclass
class VarietySettings:
    """Mean pairwise (1 - cos) among centre crops, so a changing background does not count as a new pose."""

    center_crop: float = _f(0.6, "side fraction of the centred crop that is embedded (1.0: whole image)")
    full_at: float = _f(0.25, "mean pairwise (1 - cos) that scores 1 (real photos of one subject: ~0.12)")

    def __post_init__(self) -> None:
        if not 0.1 <= self.center_crop <= 1.0:
            raise ConfigError(f"[pose_variety] center_crop = {self.center_crop}: use a fraction in 0.1..1.0")
        if not self.full_at > 0:
            raise ConfigError(f"[pose_variety] full_at = {self.full_at}: must be > 0")


@dataclass
class StyleSettings:
    """Cosine of each sample to the centroid of the style images."""

    low: float = _f(0.5, "raw cosine to the centroid mapped to 0")
    high: float = _f(1.0, "raw cosine to the centroid mapped to 1")

    def __post_init__(self) -> None:
        _check_bounds("[style]", self.low, self.high)


@dataclass
class AdherenceSettings:
    """CLIP-T (raw cosine of image and prompt) normalized; raw values live around 0.20..0.35."""

    low: float = _f(0.15, "raw CLIP-T mapped to 0")
    high: float = _f(0.35, "raw CLIP-T mapped to 1")

    def __post_init__(self) -> None:
        _check_bounds("[prompt_adherence]", self.low, self.high)


@dataclass
class TechnicalSettings:
    """Bounds that map pixel statistics to 0..1; the technical score is the mean of five sub-scores."""

    analysis_size: int = _f(512, "images are downscaled so the long side is at most this before measuring")
    sharpness_low: float = _f(20.0, "Laplacian variance of luma (0..255) scoring 0; log scale in between")
    sharpness_high: float = _f(500.0, "Laplacian variance of luma scoring 1")
    exposure_tolerance: float = _f(0.25, "mean luma within 0.5 +- this scores 1, falling to 0 at 0 or 1")
    clip_max_fraction: float = _f(0.20, "fraction of pixels with luma <= 5 or >= 250 that scores 0")
    contrast_low: float = _f(0.05, "RMS contrast (std of luma in 0..1) scoring 0")
    contrast_high: float = _f(0.20, "RMS contrast scoring 1")
    colorfulness_low: float = _f(0.0, "Hasler-Suesstrunk colorfulness scoring 0")
    colorfulness_high: float = _f(45.0, "colorfulness scoring 1 ('averagely colorful' in their scale)")

    def __post_init__(self) -> None:
        if self.analysis_size < 32:
            raise ConfigError(f"[technical] analysis_size = {self.analysis_size}: must be at least 32")
        if not (0 < self.sharpness_low < self.sharpness_high):
            raise ConfigError("[technical] sharpness_low must be > 0 and below sharpness_high")
        if not 0 <= self.exposure_tolerance < 0.5:
            raise ConfigError(f"[technical] exposure_tolerance = {self.exposure_tolerance}: use 0..0.5")
        if not 0 < self.clip_max_fraction <= 1:
            raise ConfigError(f"[technical] clip_max_fraction = {self.clip_max_fraction}: use 0..1")
        _check_bounds("[technical] contrast", self.contrast_low, self.contrast_high)
        _check_bounds("[technical] colorfulness", self.colorfulness_low, self.colorfulness_high)


@dataclass
class EvaluatorSettings:
    """Everything the evaluator reads from ``configs/evaluator.toml``."""

    references: str = _f("data/references", "folder of reference images of the character")
    style_references: str = _f("", "folder of style images; empty: the run's training images")
    verify_threshold: float = _f(0.75, "verify-dataset: best cosine to any reference needed to pass")
    clip: ClipSettings = field(default_factory=ClipSettings)
    weights: Weights = field(default_factory=Weights)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    pose_variety: VarietySettings = field(default_factory=VarietySettings)
    style: StyleSettings = field(default_factory=StyleSettings)
    prompt_adherence: AdherenceSettings = field(default_factory=AdherenceSettings)
    technical: TechnicalSettings = field(default_factory=TechnicalSettings)

    def with_overrides(self, clip_model: Optional[str] = None, clip_pretrained: Optional[str] = None,
                       references: Optional[str] = None) -> "EvaluatorSettings":
        """A copy with the command-line overrides applied (``None`` keeps the file's value)."""
        clip = self.clip
        if clip_model is not None or clip_pretrained is not None:
            clip = dataclasses.replace(
                clip,
                model=clip_model if clip_model is not None else clip.model,
                pretrained=clip_pretrained if clip_pretrained is not None else clip.pretrained,
            )
        return dataclasses.replace(
            self, clip=clip, references=references if references is not None else self.references)


_HINTS = {cls: typing.get_type_hints(cls) for cls in (
    EvaluatorSettings, ClipSettings, Weights, IdentitySettings, VarietySettings, StyleSettings,
    AdherenceSettings, TechnicalSettings)}


def _coerce(where: str, hint: Any, value: Any) -> Any:
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a quoted string"}
    raise ConfigError(f"{where} = {value!r}: write {names.get(hint, hint)}")


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys and ill-typed values."""
    hints = _HINTS[cls]
    values = {}
    for key, value in table.items():
        if key not in hints:
            near = difflib.get_close_matches(key, list(hints), n=1)
            hint = f"did you mean '{near[0]}'?" if near else "remove it"
            raise ConfigError(f"{where}: unknown key '{key}'; {hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{key}' must be a [{key}] table")
            values[key] = _build(hint_type, value, f"{where} [{key}]")
        else:
            values[key] = _coerce(f"{where}: {key}", hint_type, value)
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def settings_from_dict(data: dict[str, Any], where: str = "evaluator settings") -> EvaluatorSettings:
    """Build settings from a parsed TOML dict (the layout of ``configs/evaluator.toml``)."""
    return _build(EvaluatorSettings, data, where)


def default_settings_path() -> Optional[Path]:
    """``configs/evaluator.toml`` under the current folder, else the project's own copy, else None."""
    for candidate in (DEFAULT_SETTINGS_PATH, _PROJECT_SETTINGS_PATH):
        if candidate.is_file():
            return candidate
    return None


def load_settings(path: str | Path | None = None) -> EvaluatorSettings:
    """Read evaluator settings strictly; ``None`` reads :func:`default_settings_path` (or the defaults)."""
    if path is None:
        path = default_settings_path()
        if path is None:
            return EvaluatorSettings()
    return settings_from_dict(read_toml(path, "evaluator settings"), str(path))
