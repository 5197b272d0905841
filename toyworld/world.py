"""The toy world: coloured shapes on coloured backgrounds, 64 px, with captions that name them.

Every image shows one shape of one colour at one of five positions on a plain background, drawn
with a little jitter in place and size. Its caption names the things a prompt can ask for, as
comma-separated tags: ``red circle, sky background, left``. A caption may leave tags out (and the
pretraining drops whole captions, so the model also learns the unconditional image for CFG).

The base Stable Diffusion model is pretrained on the world *without* the held-out shape (``star``) and
colour (``pink``); the toy CLIP is trained on all of it, as a real CLIP knows far more than any one
diffusion model. The held-out character is a pink star: the base model has never drawn one, and the
demo's LoRA has to learn it from a kohya dataset whose captions call it by a trigger word.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterable, Optional

from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (130, 50, 170), "white": (245, 245, 245), "pink": (255, 105, 190),
}
# Backgrounds are named by what they look like, not by a colour word: with "green square, green
# background" a small text encoder has to bind each colour word to the noun after it, which it learns
# far more slowly than a word of its own.
BACKGROUNDS = {
    "snow": (235, 235, 230), "night": (25, 25, 30), "stone": (128, 128, 128), "sky": (120, 170, 230),
    "grass": (120, 190, 120), "wood": (140, 95, 60), "sand": (235, 225, 150),
}
POSITIONS = {"center": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27),
             "bottom": (0.5, 0.73)}
HELD_OUT_SHAPE = "star"
HELD_OUT_COLOR = "pink"
# The character the demo's LoRA learns (never seen by the base model) and the trigger word that names it.
CHARACTER = ("pink", "star")
TRIGGER = "zkx"
# Words of the world, in the order the base model's tokenizer learns them.
WORDS = tuple(dict.fromkeys([*SHAPES, *COLORS, *BACKGROUNDS, "background", *POSITIONS]))


@dataclass(frozen=True)
class Scene:
    """What one image shows."""

    shape: str
    color: str
    background: str
    position: str

    def caption(self, tags: Iterable[str] = ("object", "background", "position")) -> str:
        """Comma-separated tags: ``"red circle, sky background, left"`` (only the ``tags`` asked for)."""
        parts = {"object": f"{self.color} {self.shape}", "background": f"{self.background} background",
                 "position": self.position}
        return ", ".join(parts[t] for t in tags)


def clashes(color: str, background: str) -> bool:
    """Colour and background too alike to tell apart (a white shape on a white background)."""
    a, b = COLORS[color], BACKGROUNDS[background]
    return sum(abs(x - y) for x, y in zip(a, b)) < 120


def random_scene(rng: random.Random, held_out: bool = True) -> Scene:
    """A random scene; without ``held_out`` the held-out shape and colour never appear."""
    shapes = [s for s in SHAPES if held_out or s != HELD_OUT_SHAPE]
    colors = [c for c in COLORS if held_out or c != HELD_OUT_COLOR]
    while True:
        scene = Scene(rng.choice(shapes), rng.choice(colors), rng.choice(list(BACKGROUNDS)),
                      rng.choice(list(POSITIONS)))
        if not clashes(scene.color, scene.background):
            return scene


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    """Corners of a polygon shape: alternating radii go round from angle ``start``, turned by ``turn``."""
    corners, start, radii = {
        "square": (4, math.pi / 4, (1.2,)),
        "triangle": (3, -math.pi / 2, (1.3,)),
        "diamond": (4, 0.0, (0.85, 1.3)),  # taller than wide
        "star": (10, -math.pi / 2, (1.35, 0.55)),  # five points
    }[shape]
    points = []
    for i in range(corners):
        angle = start + turn + 2 * math.pi * i / corners
        radius = r * radii[i % len(radii)]
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw(scene: Scene, rng: Optional[random.Random] = None, size: int = SIZE) -> Image.Image:
    """The scene as an RGB image; ``rng`` jitters place, size and turn (none: the canonical drawing)."""
    jitter = (lambda a: rng.uniform(-a, a)) if rng else (lambda a: 0.0)
    px, py = POSITIONS[scene.position]
    cx, cy = (px + jitter(0.05)) * size, (py + jitter(0.05)) * size
    r = size * (0.19 + jitter(0.025))
    image = Image.new("RGB", (size, size), _shade(BACKGROUNDS[scene.background], jitter(12)))
    canvas = ImageDraw.Draw(image)
    fill = _shade(COLORS[scene.color], jitter(10))
    if scene.shape == "circle":
        canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        canvas.polygon(_polygon(scene.shape, cx, cy, r, jitter(0.15)), fill=fill)
    return image


def _shade(rgb: tuple[int, int, int], delta: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(round(v + delta)))) for v in rgb)
