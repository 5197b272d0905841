"""Technical image quality from pixels alone (no downloaded weights).

Five measurements, each mapped to 0..1 with the bounds in ``[technical]`` of ``configs/evaluator.toml``;
the technical score is their mean:

* sharpness: variance of the 4-neighbour Laplacian of luma (0..255), mapped on a log scale between
  ``sharpness_low`` (20: visibly soft) and ``sharpness_high`` (500: crisp detail). Images are first
  downscaled so the long side is at most ``analysis_size``, because the variance depends on resolution;
* exposure: mean luma (0..1) within ``0.5 +- exposure_tolerance`` scores 1, falling linearly to 0 at
  black (0) or white (1);
* clipping: fraction of pixels with luma <= 5 or >= 250; 0 scores 1, ``clip_max_fraction`` or more 0;
* contrast: RMS contrast (standard deviation of luma in 0..1) between ``contrast_low`` and ``contrast_high``;
* colorfulness: Hasler and Suesstrunk (2003), ``sqrt(sd_rg^2 + sd_yb^2) + 0.3 * sqrt(mu_rg^2 + mu_yb^2)``
  with ``rg = R - G`` and ``yb = (R + G) / 2 - B``; on their scale 15 is "slightly", 33 "moderately",
  45 "averagely" and 59 "quite" colorful.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from evaluation.settings import TechnicalSettings

QUALITY_KEYS = ("sharpness", "exposure", "clipping", "contrast", "colorfulness")


def _linear(value: float, low: float, high: float) -> float:
    return float(min(1.0, max(0.0, (value - low) / (high - low))))


def _rgb_array(image: Image.Image, max_side: int) -> np.ndarray:
    image = image.convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float64)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an ``(H, W, 3)`` array in 0..255."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the interior pixels."""
    if min(gray.shape) < 3:
        return 0.0
    lap = (gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:] - 4 * gray[1:-1, 1:-1])
    return float(lap.var())


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler-Suesstrunk colorfulness of an ``(H, W, 3)`` array in 0..255."""
    rg = rgb[..., 0] - rgb[..., 1]
    yb = (rgb[..., 0] + rgb[..., 1]) / 2 - rgb[..., 2]
    return float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))


def measure(image: Image.Image, settings: TechnicalSettings) -> dict[str, float]:
    """The raw pixel statistics of one image (before mapping to 0..1)."""
    rgb = _rgb_array(image, settings.analysis_size)
    gray = luma(rgb)
    return {
        "laplacian_variance": laplacian_variance(gray),
        "mean_luma": float(gray.mean() / 255),
        "clipped_fraction": float(((gray <= 5) | (gray >= 250)).mean()),
        "rms_contrast": float((gray / 255).std()),
        "colorfulness": colorfulness(rgb),
    }


def score_measurements(raw: dict[str, float], s: TechnicalSettings) -> dict[str, float]:
    """Map raw statistics to the five 0..1 sub-scores, using the documented bounds."""
    log_var = math.log10(max(raw["laplacian_variance"], 1e-6))
    distance = abs(raw["mean_luma"] - 0.5)
    return {
        "sharpness": _linear(log_var, math.log10(s.sharpness_low), math.log10(s.sharpness_high)),
        "exposure": _linear(0.5 - distance, 0.0, 0.5 - s.exposure_tolerance),
        "clipping": 1.0 - _linear(raw["clipped_fraction"], 0.0, s.clip_max_fraction),
        "contrast": _linear(raw["rms_contrast"], s.contrast_low, s.contrast_high),
        "colorfulness": _linear(raw["colorfulness"], s.colorfulness_low, s.colorfulness_high),
    }


def technical_quality(image: Image.Image, settings: TechnicalSettings) -> tuple[float, dict[str, float]]:
    """Technical quality of one image in 0..1 and its details (raw statistics and sub-scores)."""
    raw = measure(image, settings)
    parts = score_measurements(raw, settings)
    return sum(parts.values()) / len(parts), {**raw, **parts}
