"""A tiny random-weight open_clip model saved as a ``local-dir:`` folder.

Used by the tests (the demo uses the trained toy CLIP in ``toyworld/``): the folder has the layout of a
real downloaded model (``open_clip_config.json`` plus ``open_clip_model.safetensors``), so it loads through the same code
as a user's CLIP. Its embeddings are random projections: fine for exercising the pipeline, useless
for judging images.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# open_clip's defaults (OpenAI CLIP normalization)
PREPROCESS_CFG = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny model (fixed seed) into ``folder`` as a local-dir model; returns ``folder``."""
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIP(**TINY_CLIP_CFG)
    config = {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder
