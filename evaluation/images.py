"""Finding and opening image files (kohya dataset folders are nested: ``data/train/10_name/*.png``)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from training.errors import LoraSearchError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def find_images(folder: str | Path, what: str, fix: str) -> list[Path]:
    """Every image under ``folder`` (recursively, sorted); a missing or empty folder is an error.

    ``what`` names the folder in the message ("reference folder") and ``fix`` says how to set it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LoraSearchError(f"{what} {folder} not found; {fix}")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise LoraSearchError(f"{what} {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); {fix}")
    return images


def open_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, fully loaded; an unreadable file is an error naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise LoraSearchError(f"cannot read image {path} ({exc}); replace or remove the file") from None
