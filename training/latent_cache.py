"""VAE latents cached on disk, shared by every run (and every trial of a study) on the same model.

An entry is one image's latents at one bucket size and orientation, stored as a small safetensors file.
Its name is a hash of everything that decides its content: ``model_key`` (the caller's identity for
the VAE weights, dtype and scaling), the SHA-256 of the image file's bytes, the bucket and resize
sizes, the orientation and the preprocessing version. So an edited image, another resolution or
another VAE finds no entry and is encoded afresh; nothing stale is ever served. Entries are written
atomically; an unreadable entry (a crash mid-write on another filesystem, a truncated copy) is
encoded again rather than failing the run. Runs writing the same entry at once both write the same
bytes, and the rename makes one of them win.

``color_aug`` cannot use cached latents: it changes the pixels every time an image is seen, so the
training loop encodes those batches on the fly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from training.atomic import atomic_write_with
from training.buckets import BucketFit
from training.data import ImageItem, TrainDataset, load_pixels

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# bump when load_pixels changes what it produces, so old entries are not reused
PREPROCESS_VERSION = 1
_TENSOR = "latents"

EncodeFn = Callable[["torch.Tensor"], "torch.Tensor"]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LatentCache:
    """Latents under ``cache_dir/<model hash>/<2 hex>/<entry hash>.safetensors``."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)

    def entry_path(self, model_key: str, image_sha256: str, fit: BucketFit, flip: bool) -> Path:
        """Where the entry for this model, image content, size and orientation lives."""
        spec = {"version": PREPROCESS_VERSION, "model": model_key, "image": image_sha256,
                "bucket": list(fit.bucket), "resized": list(fit.resized), "flip": bool(flip)}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        model_dir = hashlib.sha256(model_key.encode()).hexdigest()[:16]
        return self.cache_dir / model_dir / key[:2] / f"{key}.safetensors"

    def get_or_encode(self, items: Sequence[ImageItem], sizes: Sequence[BucketFit], encode_fn: EncodeFn,
                      model_key: str, flip: bool = False, batch_size: int = 1) -> list["torch.Tensor"]:
        """Latents of every item at its size (mirrored when ``flip``), encoding only what is not cached.

        ``encode_fn(pixels)`` takes a (B, 3, H, W) float32 batch in [-1, 1] of one size and returns
        (B, C, h, w) latents exactly as training uses them (scaled). Batches hold up to ``batch_size``
        images of the same size. The returned tensors are float32 on the CPU, in ``items`` order.
        """
        paths = [self.entry_path(model_key, file_sha256(item.path), fit, flip)
                 for item, fit in zip(items, sizes, strict=True)]
        latents: list[Optional[torch.Tensor]] = [_read_entry(path) for path in paths]
        todo = [i for i, latent in enumerate(latents) if latent is None]
        if todo:
            log.info("encoding %d of %d images into the latent cache %s", len(todo), len(items), self.cache_dir)
        for chunk in _same_size_chunks(todo, sizes, batch_size):
            encoded = _encode(chunk, items, sizes, encode_fn, flip)
            for index, latent in zip(chunk, encoded):
                _write_entry(paths[index], latent, items[index], model_key)
                latents[index] = latent
        return latents  # type: ignore[return-value]

    def encode_dataset(self, dataset: TrainDataset, encode_fn: EncodeFn, model_key: str,
                       batch_size: int = 1) -> tuple[list["torch.Tensor"], Optional[list["torch.Tensor"]]]:
        """(latents, flipped latents or None) for every image of ``dataset``, for ``TrainDataset.make_batch``.

        Flipped latents are cached too when the dataset uses ``flip_aug``.
        """
        if dataset.options.color_aug:
            raise ValueError("color_aug changes pixels every step; encode those batches on the fly")
        latents = self.get_or_encode(dataset.items, dataset.fits, encode_fn, model_key, False, batch_size)
        flipped = None
        if dataset.options.flip_aug:
            flipped = self.get_or_encode(dataset.items, dataset.fits, encode_fn, model_key, True, batch_size)
        return latents, flipped


def _same_size_chunks(indices: list[int], sizes: Sequence[BucketFit], batch_size: int) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for index in indices:
        groups.setdefault((sizes[index].bucket, sizes[index].resized), []).append(index)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), max(1, batch_size))]


def _encode(chunk: list[int], items: Sequence[ImageItem], sizes: Sequence[BucketFit], encode_fn: EncodeFn,
            flip: bool) -> list["torch.Tensor"]:
    import torch

    pixels = torch.stack([load_pixels(items[i].path, sizes[i], flip) for i in chunk])
    with torch.no_grad():
        encoded = encode_fn(pixels)
    if encoded.shape[0] != len(chunk):
        raise ValueError(f"encode_fn returned {encoded.shape[0]} latents for {len(chunk)} images")
    return [latent.detach().to("cpu", torch.float32).contiguous() for latent in encoded]


def _read_entry(path: Path) -> Optional["torch.Tensor"]:
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        latent = load_file(str(path))[_TENSOR]
    except Exception as exc:  # any unreadable entry is a cache miss, never a failed run
        log.warning("latent cache entry %s is unreadable (%s); encoding it again", path, exc)
        return None
    return latent


def _write_entry(path: Path, latent: "torch.Tensor", item: ImageItem, model_key: str) -> None:
    from safetensors.torch import save_file

    metadata = {"image": str(item.path), "model_key": model_key, "version": str(PREPROCESS_VERSION)}
    atomic_write_with(path, lambda tmp: save_file({_TENSOR: latent}, str(tmp), metadata=metadata))
