"""Aspect-ratio buckets as kohya sd-scripts makes them.

Every bucket holds about ``resolution`` width x height pixels with both sides a multiple of ``steps``.
An image goes to the bucket whose aspect ratio is nearest its own, is resized (keeping its aspect) until
it covers the bucket, and is center-cropped to it. With ``no_upscale`` there are no predefined buckets:
an image larger than the target area is shrunk to that area, a smaller one keeps its size, and the
bucket is that size rounded down to ``steps`` so the image is only ever cropped, never enlarged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class BucketFit:
    """Where one image goes: its ``bucket`` (w, h) and the ``resized`` (w, h) it is scaled to before the crop."""

    bucket: Size
    resized: Size

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the center crop in resized pixels; SDXL's time ids use it."""
        return (self.resized[1] - self.bucket[1]) // 2, (self.resized[0] - self.bucket[0]) // 2


def make_buckets(resolution: Size, min_reso: int = 256, max_reso: int = 1024, steps: int = 64,
                 no_upscale: bool = False) -> list[Size]:
    """The predefined bucket sizes, sorted; empty with ``no_upscale`` (each image then sizes its own)."""
    if no_upscale:
        return []
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area) // steps) * steps
    sizes = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (area // width) // steps * steps)
        if height >= min_reso:
            sizes.add((width, height))
            sizes.add((height, width))
        width += steps
    return sorted(sizes)


def assign_bucket(width: int, height: int, buckets: Sequence[Size], resolution: Size, steps: int = 64,
                  no_upscale: bool = False) -> BucketFit:
    """The bucket for a ``width`` x ``height`` image.

    ``buckets`` comes from :func:`make_buckets` (or is ``[resolution]`` when bucketing is off, which
    resizes and center-crops every image to the resolution). With ``no_upscale`` it is ignored.
    """
    if no_upscale:
        return _fit_without_upscale(width, height, resolution[0] * resolution[1], steps)
    aspect = width / height
    if (width, height) in buckets:
        bucket = (width, height)
    else:
        # min() keeps the first of equal errors, as numpy's argmin does in sd-scripts
        bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))
    if aspect > bucket[0] / bucket[1]:
        scale = bucket[1] / height  # wider than the bucket: match heights, crop the sides
    else:
        scale = bucket[0] / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    return BucketFit(bucket=tuple(bucket), resized=resized)


def _round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


def _aspect_error(width: int, height: int, aspect: float) -> float:
    return abs(width / height - aspect) if height else math.inf


def _fit_without_upscale(width: int, height: int, area: int, steps: int) -> BucketFit:
    aspect = width / height
    if width * height > area:
        # shrink to the target area, then round whichever side keeps the aspect ratio closer
        scaled_w = math.sqrt(area * aspect)
        scaled_h = area / scaled_w
        w_rounded = _round_to_steps(scaled_w, steps)
        h_for_w = _round_to_steps(w_rounded / aspect, steps)
        h_rounded = _round_to_steps(scaled_h, steps)
        w_for_h = _round_to_steps(h_rounded * aspect, steps)
        if _aspect_error(w_rounded, h_for_w, aspect) < _aspect_error(w_for_h, h_rounded, aspect):
            resized = (w_rounded, int(w_rounded / aspect + 0.5))
        else:
            resized = (int(h_rounded * aspect + 0.5), h_rounded)
    else:
        resized = (width, height)
    bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
    return BucketFit(bucket=bucket, resized=resized)
