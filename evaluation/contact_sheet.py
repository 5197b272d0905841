"""Contact sheets: an epoch's samples in a grid, each labelled with its prompt index and score."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from training.atomic import atomic_write_with

THUMB = 256
LABEL_HEIGHT = 18
HEADER_HEIGHT = 24
PAD = 4


def _thumbnail(image: Image.Image) -> Image.Image:
    image = ImageOps.contain(image.convert("RGB"), (THUMB, THUMB), Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (THUMB, THUMB), (32, 32, 32))
    tile.paste(image, ((THUMB - image.width) // 2, (THUMB - image.height) // 2))
    return tile


def render_contact_sheet(images: Sequence[Image.Image], labels: Sequence[str], title: str) -> Image.Image:
    """A grid of thumbnails (about square), one label under each and a title line on top."""
    columns = max(1, math.ceil(math.sqrt(len(images))))
    rows = max(1, math.ceil(len(images) / columns))
    cell_w, cell_h = THUMB + PAD, THUMB + LABEL_HEIGHT + PAD
    font = ImageFont.load_default()
    title_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)) + 2 * PAD
    width = max(columns * cell_w + PAD, title_w)
    sheet = Image.new("RGB", (width, HEADER_HEIGHT + rows * cell_h + PAD), (16, 16, 16))
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, 6), title, fill=(240, 240, 240), font=font)
    for n, (image, label) in enumerate(zip(images, labels)):
        x = PAD + (n % columns) * cell_w
        y = HEADER_HEIGHT + (n // columns) * cell_h
        sheet.paste(_thumbnail(image), (x, y))
        draw.text((x + 2, y + THUMB + 3), label, fill=(230, 230, 230), font=font)
    return sheet


def write_contact_sheet(path: Path, images: Sequence[Image.Image], labels: Sequence[str], title: str) -> Path:
    """Render and save a contact sheet PNG atomically."""
    sheet = render_contact_sheet(images, labels, title)
    return atomic_write_with(path, lambda tmp: sheet.save(tmp, format="PNG"))
