"""The toy world: a small pretrained Stable Diffusion model, a toy CLIP and a held-out character.

``lora-search demo`` and the outcome tests live here. The models are built by ``python -m
toyworld.build`` (see :mod:`toyworld.build`) and committed under ``toyworld/assets/`` so that nobody
pays for the build at run time; :mod:`toyworld.world` says what the world is.
"""

from __future__ import annotations

from pathlib import Path

from training.errors import LoraSearchError

ASSETS = Path(__file__).resolve().with_name("assets")
MODEL = ASSETS / "model"
SD3 = ASSETS / "sd3"  # the SD3 toy model (python -m toyworld.build_dit)
CLIP = ASSETS / "clip"
TRAIN = ASSETS / "data" / "train"
REFERENCES = ASSETS / "data" / "references"
CALIBRATION = ASSETS / "calibration.json"  # evaluator bounds measured for the toy CLIP


def require_assets() -> None:
    """Fail with one line naming the fix when the committed toy-world files are missing."""
    for path in (MODEL / "model_index.json", CLIP / "open_clip_config.json", TRAIN, REFERENCES, CALIBRATION):
        if not path.exists():
            raise LoraSearchError(f"toy-world file {path} is missing; rebuild it with python -m toyworld.build "
                                  "(about 12 minutes on 2 CPU cores) or restore toyworld/assets from git")
