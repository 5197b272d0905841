"""The CLIP-based score components, as pure functions of unit-length embeddings.

Each function returns a score in 0..1 and the raw per-image values behind it. Raw cosines are
mapped with ``(raw - low) / (high - low)`` clipped to 0..1, with the bounds from
``configs/evaluator.toml``. The technical component lives in :mod:`evaluation.quality`.
"""

from __future__ import annotations

from typing import Any, Sequence

from PIL import Image

from evaluation.settings import AdherenceSettings, IdentitySettings, StyleSettings, VarietySettings


def normalize(value: float, low: float, high: float) -> float:
    """``value`` mapped linearly from ``low..high`` to ``0..1`` and clipped."""
    return float(min(1.0, max(0.0, (value - low) / (high - low))))


def identity(samples: Any, references: Any, s: IdentitySettings) -> tuple[float, list[float]]:
    """CLIP-I: per sample, the mean cosine to all references (or to its ``top_k`` most similar ones).

    Returns the normalized mean over samples and each sample's raw similarity.
    """
    sims = samples @ references.T
    if s.aggregation == "topk":
        k = min(s.top_k, sims.shape[1])
        per_sample = sims.topk(k, dim=1).values.mean(dim=1)
    else:
        per_sample = sims.mean(dim=1)
    raw = [float(v) for v in per_sample]
    return normalize(sum(raw) / len(raw), s.low, s.high), raw


def centre_crop(image: Image.Image, fraction: float) -> Image.Image:
    """The centred crop whose sides are ``fraction`` of the image's (where a character sample's subject is)."""
    if fraction >= 1.0:
        return image
    w, h = image.size
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def _pairs(groups: Sequence[Any]) -> list[tuple[int, int]]:
    """Index pairs within each group of equal keys; across all samples when no group has two."""
    by_key: dict[Any, list[int]] = {}
    for i, key in enumerate(groups):
        by_key.setdefault(key, []).append(i)
    sets = [idx for idx in by_key.values() if len(idx) > 1] or [list(range(len(groups)))]
    return [(a, b) for idx in sets for n, a in enumerate(idx) for b in idx[n + 1:]]


def pose_variety(crops: Any, groups: Sequence[Any], s: VarietySettings) -> tuple[float, float]:
    """Mean pairwise (1 - cos) among centre-crop embeddings, scaled so ``full_at`` scores 1.

    ``groups`` holds each sample's prompt: when a prompt was sampled with several seeds, only pairs of
    the same prompt count (the background is then the same, so what differs is the pose); otherwise
    all pairs count, and the centre crop keeps most of each prompt's background out. Returns the
    score and the raw mean distance; a single sample has no variety (0).
    """
    pairs = _pairs(groups)
    if not pairs:
        return 0.0, 0.0
    sims = crops @ crops.T
    raw = sum(1.0 - float(sims[a, b]) for a, b in pairs) / len(pairs)
    raw = max(0.0, raw)  # float error can make identical embeddings a hair negative
    return normalize(raw, 0.0, s.full_at), raw


def style(samples: Any, style_embeddings: Any, s: StyleSettings) -> tuple[float, list[float]]:
    """Cosine of each sample to the (unit-length) centroid of the style images, normalized mean."""
    import torch

    centroid = torch.nn.functional.normalize(style_embeddings.mean(dim=0), dim=0)
    raw = [float(v) for v in samples @ centroid]
    return normalize(sum(raw) / len(raw), s.low, s.high), raw


def prompt_adherence(samples: Any, prompts: Any, s: AdherenceSettings) -> tuple[float, list[float]]:
    """CLIP-T: cosine of each sample to its own prompt's embedding (row i to row i), normalized mean."""
    raw = [float(v) for v in (samples * prompts).sum(dim=1)]
    return normalize(sum(raw) / len(raw), s.low, s.high), raw
