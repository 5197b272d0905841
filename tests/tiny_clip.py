"""Build a tiny random-weight open_clip model and save it as a ``local-dir:`` folder, and test images.

The folder has the layout of a real model downloaded from Hugging Face (``open_clip_config.json`` plus
``open_clip_model.safetensors``), so tests load it through the same code path as a user's model. Its
embeddings are random projections: fine for exercising the pipeline, useless for judging images (the
demo uses the trained toy CLIP in ``toyworld/``).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

TINY_NAME = "lora-search-tiny-clip"
TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# open_clip's defaults (OpenAI CLIP normalization)
PREPROCESS_CFG = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def register_tiny_config(folder: Path) -> str:
    """Register the tiny config with open_clip under :data:`TINY_NAME` and return that name."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    return TINY_NAME


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Write the tiny model (fixed seed) into ``folder`` as a local-dir model; returns ``folder``."""
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIP(**TINY_CFG)
    config = {"model_cfg": TINY_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Write a tiny open_clip model (random weights, fixed seed) as a local-dir folder; returns it.

    Also registers the tiny config by name, for tests of the ``model name + weights file`` path.
    """
    register_tiny_config(folder / "configs")
    return save_tiny_clip(folder / "tiny-clip", seed)


def pattern_image(seed: int, size: int = 64, cells: int = 8) -> Image.Image:
    """A colourful block pattern (sharp edges, full range), different for each seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    blocks = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST)


def flat_image(color: tuple[int, int, int], size: int = 64) -> Image.Image:
    """A single-colour image."""
    return Image.new("RGB", (size, size), color)


def populate_hub_cache(cache_dir: Path, local_dir: Path, repo: str = "lora-search/tiny-clip") -> str:
    """Copy a local-dir model into a Hugging Face cache layout (as a past download leaves it).

    Returns the ``hf-hub:`` model name that loads it offline with ``cache_dir``.
    """
    import shutil

    revision = "0" * 40
    root = cache_dir / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy(local_dir / name, snapshot / name)
    return f"hf-hub:{repo}"
