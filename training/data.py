"""The training images: kohya dataset folders, captions, buckets, pixels and the epoch's batch order.

Layout, as in sd-scripts: ``train_data_dir/N_name/`` where ``N`` is how many times each image in the
folder is repeated per epoch and ``name`` is the class tokens, used as the caption of an image that has
no ``<stem><caption_extension>`` file. Other folders are skipped with a warning.

Determinism (what makes a resumed run identical): the batch order of an epoch is a pure function of
``(seed, epoch)`` (:func:`epoch_batches`), and every random choice for one example (flip, caption
shuffle and dropout, colour shift) comes from :func:`example_rng` ``(seed, epoch, batch_no, slot)``.
No data randomness lives in global state, so nothing about the data needs saving in a training state.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

from training.buckets import BucketFit, Size, assign_bucket, make_buckets
from training.config import TrainingConfig, parse_resolution
from training.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_FOLDER_NAME = re.compile(r"^(\d+)(?:_(.*))?$")
_EXIF_ORIENTATION = 0x0112
_HUE_SHIFT_LIMIT = 8 / 180  # sd-scripts shifts OpenCV hue (0..180) by up to 8


class DatasetError(ConfigError):
    """A training image or dataset folder cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class ImageItem:
    """One training image: ``caption`` is the class tokens when ``caption_missing``; size after EXIF rotation."""

    path: Path
    caption: str
    caption_missing: bool
    repeats: int
    class_tokens: str
    width: int
    height: int


# --------------------------------------------------------------------------- scanning


def parse_folder_name(name: str) -> Optional[tuple[int, str]]:
    """``"10_ohwx woman"`` -> ``(10, "ohwx woman")``; None for a folder without a repeat prefix."""
    match = _FOLDER_NAME.match(name)
    if match is None:
        return None
    return int(match.group(1)), (match.group(2) or "").strip()


def _orientation(img: Image.Image) -> int:
    # a PNG's getexif() decodes the whole image when the header has no EXIF; such files are upright
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    return img.getexif().get(_EXIF_ORIENTATION, 1)


def read_image_size(path: Path) -> Size:
    """(width, height) as the image will be shown (EXIF rotation applied), read without decoding pixels."""
    fix = "re-export it or remove it from the dataset"
    try:
        with Image.open(path) as img:
            img.verify()  # checks the file's structure (PNG checksums) without decoding
        with Image.open(path) as img:
            width, height = img.size
            orientation = _orientation(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"image {path} cannot be read ({exc}); {fix}") from None
    if width < 1 or height < 1:
        raise DatasetError(f"image {path} has no pixels; {fix}")
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _read_caption(image: Path, extension: str) -> Optional[str]:
    caption_path = image.with_name(image.stem + extension)
    if not caption_path.is_file():
        return None
    try:
        text = caption_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"caption {caption_path} is not UTF-8 text; save it as UTF-8") from None
    # sd-scripts uses the first line only
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else None


def _scan_folder(folder: Path, repeats: int, class_tokens: str, extension: str,
                 skip_unreadable: bool) -> list[ImageItem]:
    items, missing = [], 0
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        try:
            width, height = read_image_size(path)
        except DatasetError as exc:
            if not skip_unreadable:
                raise
            log.warning("skipping %s", exc)
            continue
        caption = _read_caption(path, extension)
        missing += caption is None
        items.append(ImageItem(path=path, caption=class_tokens if caption is None else caption,
                               caption_missing=caption is None, repeats=repeats,
                               class_tokens=class_tokens, width=width, height=height))
    if missing:
        log.warning("%d image(s) in %s have no %s caption; using the class tokens %r", missing, folder,
                    extension, class_tokens)
    return items


def scan_dataset(train_data_dir: str | Path | None, caption_extension: str = ".caption",
                 skip_unreadable: bool = False) -> list[ImageItem]:
    """Every training image under ``train_data_dir``'s ``N_name`` folders, in a stable (sorted) order.

    An unreadable image is a :class:`DatasetError`, or a logged warning and skipped with
    ``skip_unreadable``. Folders without a repeat prefix are skipped with a warning, as sd-scripts does.
    """
    if not train_data_dir:
        raise ConfigError("train_data_dir is not set; add train_data_dir = \"path/to/images\" under [dataset]")
    root = Path(train_data_dir)
    if not root.is_dir():
        raise DatasetError(f"train_data_dir {root} is not a folder; check the path")
    extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    items: list[ImageItem] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        parsed = parse_folder_name(folder.name)
        if parsed is None or parsed[0] == 0:
            log.warning("skipping folder %s: its name does not start with a repeat count above 0 "
                        "(rename it like 10_%s to train on it)", folder, folder.name)
            continue
        items += _scan_folder(folder, parsed[0], parsed[1], extension, skip_unreadable)
    if not items:
        raise DatasetError(f"no training images found in {root}; put images in subfolders named N_name "
                           f"(N = repeats), e.g. {root / '10_ohwx woman'}")
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir()):
        log.warning("images directly in %s are not used; move them into an N_name subfolder", root)
    return items


# --------------------------------------------------------------------------- captions


def process_caption(caption: str, keep_tokens: int, shuffle: bool, dropout_rate: float,
                    rng: random.Random) -> str:
    """The caption trained on for one example, by sd-scripts' rules.

    With probability ``dropout_rate`` the whole caption is dropped (""). Otherwise, when ``shuffle``,
    the comma-separated tags after the first ``keep_tokens`` are shuffled and rejoined with ", ".
    """
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = [tag.strip() for tag in caption.split(",")]
    tags = [tag for tag in tags if tag]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(fixed + rest)


# --------------------------------------------------------------------------- options and buckets


@dataclass(frozen=True)
class DataOptions:
    """The dataset keys of a :class:`TrainingConfig` that shape what the model sees."""

    resolution: Size
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    keep_tokens: int = 0
    shuffle_caption: bool = False
    caption_dropout_rate: float = 0.0
    flip_aug: bool = False
    color_aug: bool = False

    def __post_init__(self) -> None:
        steps, (width, height) = self.bucket_reso_steps, self.resolution
        if steps % 8:
            raise ConfigError(f"bucket_reso_steps = {steps}: use a multiple of 8 (the VAE works on 8-pixel blocks)")
        if width % steps or height % steps:
            raise ConfigError(f"resolution = \"{width},{height}\": each side must be a multiple of "
                              f"bucket_reso_steps ({steps}); e.g. {width - width % steps or steps}")
        if self.enable_bucket and not self.bucket_no_upscale and not (
                self.min_bucket_reso <= min(width, height) and max(width, height) <= self.max_bucket_reso):
            raise ConfigError(f"resolution = \"{width},{height}\" must lie between min_bucket_reso "
                              f"({self.min_bucket_reso}) and max_bucket_reso ({self.max_bucket_reso}); change one")

    @classmethod
    def from_config(cls, cfg: TrainingConfig) -> "DataOptions":
        """Options from a training config; ``resolution`` must be set."""
        if cfg.resolution is None:
            raise ConfigError('resolution is not set; add resolution = "512,512" under [dataset]')
        return cls(resolution=parse_resolution(cfg.resolution), enable_bucket=cfg.enable_bucket,
                   min_bucket_reso=cfg.min_bucket_reso, max_bucket_reso=cfg.max_bucket_reso,
                   bucket_reso_steps=cfg.bucket_reso_steps, bucket_no_upscale=cfg.bucket_no_upscale,
                   keep_tokens=cfg.keep_tokens, shuffle_caption=cfg.shuffle_caption,
                   caption_dropout_rate=cfg.caption_dropout_rate, flip_aug=cfg.flip_aug, color_aug=cfg.color_aug)


def fit_items(items: Sequence[ImageItem], options: DataOptions) -> list[BucketFit]:
    """The bucket of every image; without ``enable_bucket`` every image is cropped to the resolution."""
    if not options.enable_bucket:
        buckets, no_upscale = [options.resolution], False
    else:
        no_upscale = options.bucket_no_upscale
        buckets = make_buckets(options.resolution, options.min_bucket_reso, options.max_bucket_reso,
                               options.bucket_reso_steps, no_upscale)
    fits = []
    for item in items:
        fit = assign_bucket(item.width, item.height, buckets, options.resolution, options.bucket_reso_steps,
                            no_upscale)
        if min(fit.bucket) < options.bucket_reso_steps:
            raise DatasetError(f"image {item.path} ({item.width}x{item.height}) is smaller than "
                               f"bucket_reso_steps ({options.bucket_reso_steps}); remove it or turn off "
                               "bucket_no_upscale")
        fits.append(fit)
    return fits


# --------------------------------------------------------------------------- pixels


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"image {path} cannot be decoded ({exc}); re-export it or remove it") from None
    if img.mode.startswith("I"):  # 16/32-bit greyscale: keep the top 8 bits rather than clipping to white
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def decode_image(path: str | Path) -> None:
    """Decode ``path`` completely as training will; a damaged image is a :class:`DatasetError` naming it."""
    _open_rgb(Path(path))


def color_augment(pixels: "torch.Tensor", rng: random.Random) -> "torch.Tensor":
    """sd-scripts' colour jitter on a [0, 1] image: a third of the time a small hue shift or gamma change."""
    from torchvision.transforms import functional as tvf

    if rng.random() > 0.33:
        return pixels
    if rng.random() > 0.5:
        return tvf.adjust_hue(pixels, rng.uniform(-_HUE_SHIFT_LIMIT, _HUE_SHIFT_LIMIT))
    return pixels.clamp(0, 1) ** rng.uniform(0.95, 1.05)


def load_pixels(path: str | Path, fit: BucketFit, flip: bool = False,
                color_rng: Optional[random.Random] = None) -> "torch.Tensor":
    """The image as a float32 (3, H, W) tensor in [-1, 1] at ``fit.bucket``.

    EXIF rotation applied, transparency composited on white, resized to ``fit.resized`` (aspect kept)
    and center-cropped. ``flip`` mirrors it; ``color_rng`` applies :func:`color_augment`.
    """
    import numpy as np
    import torch

    img = _open_rgb(Path(path))
    if img.size != fit.resized:
        img = img.resize(fit.resized, Image.Resampling.LANCZOS)
    top, left = fit.crop_top_left
    img = img.crop((left, top, left + fit.bucket[0], top + fit.bucket[1]))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    if color_rng is not None:
        pixels = color_augment(pixels, color_rng)
    if flip:
        pixels = pixels.flip(-1)
    return pixels * 2.0 - 1.0


# --------------------------------------------------------------------------- epoch order


def epoch_batches(items: Sequence[ImageItem], buckets: Sequence[Size], batch_size: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """The batches of one epoch as lists of indices into ``items``; a pure function of (seed, epoch).

    ``buckets[i]`` is the bucket size of ``items[i]``. Each image appears ``repeats`` times. As in
    sd-scripts, every bucket's examples are shuffled and cut into batches of ``batch_size`` (the last
    one of a bucket may be smaller), then the batches of all buckets are shuffled together, so one
    batch never mixes sizes. A resumed run asks for the same epoch and gets the same order.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    # a str seed hashes with SHA-512, the same on every machine and Python run
    rng = random.Random(f"lora-search epoch order {seed} {epoch}")
    groups: dict[Size, list[int]] = {}
    for index, (item, bucket) in enumerate(zip(items, buckets, strict=True)):
        groups.setdefault(tuple(bucket), []).extend([index] * item.repeats)
    batches: list[list[int]] = []
    for bucket in sorted(groups):
        members = groups[bucket]
        rng.shuffle(members)
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


def count_batches(items: Sequence[ImageItem], buckets: Sequence[Size], batch_size: int) -> int:
    """``len(epoch_batches(...))`` without building it (the same for every epoch)."""
    counts: dict[Size, int] = {}
    for item, bucket in zip(items, buckets, strict=True):
        counts[tuple(bucket)] = counts.get(tuple(bucket), 0) + item.repeats
    return sum(-(-n // batch_size) for n in counts.values())


def step_shapes(items: Sequence[ImageItem], buckets: Sequence[Size], batch_size: int,
                padded: bool = True) -> dict[tuple[int, int, int], int]:
    """Batches per epoch of each distinct (batch, width, height) the training step sees, in pixels.

    A compiled step compiles once per shape. ``padded`` (what the trainer does) fills a bucket's short
    last batch up to ``batch_size`` (see :meth:`TrainDataset.make_batch`), so every bucket is one shape;
    without it, as sd-scripts batches, a bucket whose examples do not divide by ``batch_size`` adds a
    second shape for its last batch.
    """
    counts: dict[Size, int] = {}
    for item, bucket in zip(items, buckets, strict=True):
        counts[tuple(bucket)] = counts.get(tuple(bucket), 0) + item.repeats
    shapes: dict[tuple[int, int, int], int] = {}
    for (width, height), n in counts.items():
        full, rest = divmod(n, batch_size)
        if full:
            shapes[(batch_size, width, height)] = full
        if rest:
            key = (batch_size if padded else rest, width, height)
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def example_rng(seed: int, epoch: int, batch_no: int, slot: int) -> random.Random:
    """The random source of the ``slot``-th example of batch ``batch_no`` in ``epoch``."""
    return random.Random(f"lora-search example {seed} {epoch} {batch_no} {slot}")


# --------------------------------------------------------------------------- the dataset


@dataclass
class Batch:
    """One batch, ready for the model. ``pixels`` (B, 3, H, W) in [-1, 1] or cached ``latents``; one is None.

    ``original_hw``, ``crop_top_left`` and ``target_hw`` are per example, in SDXL's (height, width)
    order, for its size conditioning. ``weights`` are per-example loss weights for a padded batch (0 for
    the padding rows, ``rows / real rows`` for the others, so the mean over the batch is the mean over its
    real examples); None means every row counts 1.
    """

    indices: list[int]
    captions: list[str]
    flipped: list[bool]
    pixels: Optional["torch.Tensor"]
    latents: Optional["torch.Tensor"]
    original_hw: list[tuple[int, int]]
    crop_top_left: list[tuple[int, int]]
    target_hw: list[tuple[int, int]]
    weights: Optional["torch.Tensor"] = None


class TrainDataset:
    """Scanned images with their buckets and options; turns an epoch's index batches into :class:`Batch`."""

    def __init__(self, items: Sequence[ImageItem], options: DataOptions) -> None:
        self.items = list(items)
        self.options = options
        self.fits = fit_items(self.items, options)

    @classmethod
    def from_config(cls, cfg: TrainingConfig, skip_unreadable: bool = False) -> "TrainDataset":
        """Scan ``cfg.train_data_dir`` and size every image for ``cfg``'s resolution and buckets."""
        options = DataOptions.from_config(cfg)
        return cls(scan_dataset(cfg.train_data_dir, cfg.caption_extension, skip_unreadable), options)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_examples(self) -> int:
        """Examples per epoch: every image times its repeats."""
        return sum(item.repeats for item in self.items)

    @property
    def buckets(self) -> list[Size]:
        """The bucket size of each image."""
        return [fit.bucket for fit in self.fits]

    def epoch_batches(self, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """See :func:`epoch_batches`."""
        return epoch_batches(self.items, self.buckets, batch_size, seed, epoch)

    def batches_per_epoch(self, batch_size: int) -> int:
        return count_batches(self.items, self.buckets, batch_size)

    def caption_set(self) -> Optional[set[str]]:
        """Every caption a batch can carry (with "" when captions drop out); None when shuffled tags make them too many."""
        if self.options.shuffle_caption:
            return None
        texts = {item.caption for item in self.items}
        if self.options.caption_dropout_rate > 0:
            texts.add("")
        return texts

    def step_shapes(self, batch_size: int, padded: bool = True) -> dict[tuple[int, int, int], int]:
        """See :func:`step_shapes`."""
        return step_shapes(self.items, self.buckets, batch_size, padded)

    def make_batch(self, indices: Sequence[int], seed: int, epoch: int, batch_no: int,
                   latents: Optional[Sequence["torch.Tensor"]] = None,
                   flipped_latents: Optional[Sequence["torch.Tensor"]] = None, pad_to: int = 0) -> Batch:
        """Captions and pixels (or cached latents) for batch ``batch_no`` of ``epoch``.

        ``latents[i]`` / ``flipped_latents[i]`` are item ``i``'s cached latents (see
        :class:`training.latent_cache.LatentCache`); with them no image is decoded. They cannot be
        combined with ``color_aug``, which changes the pixels every time.

        ``pad_to``: a shorter batch (a bucket's last) is filled up to that many rows with repeats of its
        own examples, weighted 0 in the loss (``Batch.weights``): the gradient is the short batch's, and
        the step keeps one shape per bucket, so a compiled step compiles once per bucket.
        """
        import torch

        real = len(indices)
        indices = [indices[i % real] for i in range(max(real, pad_to))]
        batch = self._make(indices, seed, epoch, batch_no, latents, flipped_latents)
        if len(indices) > real:
            batch.weights = torch.tensor([len(indices) / real] * real + [0.0] * (len(indices) - real))
        return batch

    def _make(self, indices: Sequence[int], seed: int, epoch: int, batch_no: int,
              latents: Optional[Sequence["torch.Tensor"]], flipped_latents: Optional[Sequence["torch.Tensor"]]) -> Batch:
        import torch

        opts = self.options
        if latents is not None and opts.color_aug:
            raise ConfigError("color_aug cannot use cached latents; set cache_latents = false or color_aug = false")
        if latents is not None and opts.flip_aug and flipped_latents is None:
            raise ValueError("flip_aug needs flipped_latents as well as latents")
        captions, flips, tensors = [], [], []
        for slot, index in enumerate(indices):
            rng = example_rng(seed, epoch, batch_no, slot)
            caption, flip = self._draw(index, rng)
            captions.append(caption)
            flips.append(flip)
            if latents is not None:
                tensors.append((flipped_latents if flip else latents)[index])
            else:
                color_rng = rng if opts.color_aug else None
                tensors.append(load_pixels(self.items[index].path, self.fits[index], flip, color_rng))
        stacked = torch.stack(tensors)
        cached = latents is not None
        return Batch(indices=list(indices), captions=captions, flipped=flips,
                     pixels=None if cached else stacked, latents=stacked if cached else None,
                     **self._size_conditioning(indices))

    def _draw(self, index: int, rng: random.Random) -> tuple[str, bool]:
        """The example's flip and caption, drawn in a fixed order so a resume repeats them."""
        opts = self.options
        flip = opts.flip_aug and rng.random() < 0.5
        caption = process_caption(self.items[index].caption, opts.keep_tokens, opts.shuffle_caption,
                                  opts.caption_dropout_rate, rng)
        return caption, flip

    def _size_conditioning(self, indices: Sequence[int]) -> dict[str, list[tuple[int, int]]]:
        fits = [self.fits[i] for i in indices]
        return {"original_hw": [(self.items[i].height, self.items[i].width) for i in indices],
                "crop_top_left": [fit.crop_top_left for fit in fits],
                "target_hw": [(fit.bucket[1], fit.bucket[0]) for fit in fits]}
