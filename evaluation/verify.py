"""``verify-dataset``: keep only dataset images that look like the character in the references.

An image passes when its best CLIP cosine to any reference image is at least the threshold (0.75 by
default). The report is a CSV (``image,best_similarity,best_reference,passed,moved_to``), written by
default to ``{data_dir}/clip_verify_report.csv``. Rejected images can be moved, with their caption
files, to another folder that mirrors the dataset's sub-folders; nothing is deleted or overwritten.
"""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from training.atomic import atomic_write_text
from training.errors import LoraSearchError

from evaluation.clip_loader import ClipModel
from evaluation.images import find_images, open_rgb

REPORT_NAME = "clip_verify_report.csv"
CAPTION_SUFFIXES = (".txt", ".caption")


@dataclass
class ImageCheck:
    """One dataset image: its best similarity, which reference gave it, and where it went if moved."""

    path: Path
    best_similarity: float
    best_reference: Path
    passed: bool
    moved_to: Optional[Path] = None


@dataclass
class VerifyReport:
    """The result of a dataset check."""

    checks: list[ImageCheck]
    threshold: float
    report_path: Path

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.checks)

    def summary(self) -> str:
        """E.g. ``3 of 6 passed (threshold 0.75)``."""
        return f"{self.passed} of {len(self.checks)} passed (threshold {self.threshold:g})"


def _inside(path: Path, folder: Optional[Path]) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder.resolve())


def _free_stem(dest_dir: Path, stem: str, suffixes: list[str]) -> str:
    """``stem``, or ``stem-1``, ``stem-2``... so that no file with any of ``suffixes`` exists yet."""
    candidate, n = stem, 0
    while any((dest_dir / f"{candidate}{suffix}").exists() for suffix in suffixes):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def move_with_captions(image: Path, data_dir: Path, dest_root: Path) -> Path:
    """Move ``image`` and its caption files under ``dest_root`` (same sub-folder), never overwriting."""
    companions = [image.with_suffix(s) for s in CAPTION_SUFFIXES if image.with_suffix(s).is_file()]
    dest_dir = dest_root / image.parent.relative_to(data_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    stem = _free_stem(dest_dir, image.stem, [image.suffix] + [c.suffix for c in companions])
    target = dest_dir / f"{stem}{image.suffix}"
    shutil.move(str(image), str(target))
    for companion in companions:
        shutil.move(str(companion), str(dest_dir / f"{stem}{companion.suffix}"))
    return target


def _write_report(path: Path, checks: list[ImageCheck], data_dir: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "best_similarity", "best_reference", "passed", "moved_to"])
    for c in checks:
        writer.writerow([str(c.path.relative_to(data_dir)), f"{c.best_similarity:.4f}", str(c.best_reference),
                         "yes" if c.passed else "no", str(c.moved_to or "")])
    atomic_write_text(path, buffer.getvalue())


def verify_dataset(data_dir: Path, references: Path, clip: ClipModel, threshold: float = 0.75,
                   move_rejected: Optional[Path] = None, report_path: Optional[Path] = None) -> VerifyReport:
    """Check every image under ``data_dir`` (nested kohya folders too) against the reference images."""
    if not -1.0 <= threshold <= 1.0:
        raise LoraSearchError(f"--threshold {threshold} is not a cosine similarity; use a value in -1..1")
    data_dir, references = Path(data_dir), Path(references)
    ref_paths = find_images(references, "reference folder", "put images of the character there or fix --references")
    candidates = find_images(data_dir, "dataset folder", "give the folder holding the training images")
    images = [p for p in candidates if not _inside(p, references) and not _inside(p, move_rejected)]
    if not images:
        raise LoraSearchError(f"dataset folder {data_dir} has no images outside the reference and rejected folders")
    ref_emb = clip.encode_images([open_rgb(p) for p in ref_paths])
    img_emb = clip.encode_images([open_rgb(p) for p in images])
    best = (img_emb @ ref_emb.T).max(dim=1)
    checks = [ImageCheck(path=p, best_similarity=float(v), best_reference=ref_paths[int(i)],
                         passed=float(v) >= threshold)
              for p, v, i in zip(images, best.values, best.indices)]
    if move_rejected is not None:
        for check in checks:
            if not check.passed:
                check.moved_to = move_with_captions(check.path, data_dir, Path(move_rejected))
    report_path = Path(report_path) if report_path else data_dir / REPORT_NAME
    _write_report(report_path, checks, data_dir)
    return VerifyReport(checks=checks, threshold=threshold, report_path=report_path)
