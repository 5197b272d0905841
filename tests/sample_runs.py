"""Run folders as the trainer leaves them (config, prompts, sample images), for the evaluator's tests."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from PIL import Image

from tiny_clip import pattern_image

PROMPTS = ["ohwx, a character standing", "ohwx, a character sitting, indoors", "a character running, ohwx"]
# Identity and technical quality only: the two components whose order is known for the tiny CLIP.
SETTINGS_TOML = """
[weights]
identity = 0.5
pose_variety = 0.0
style = 0.0
prompt_adherence = 0.0
technical = 0.5

[identity]
aggregation = "topk"
top_k = 1
"""


def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def run_settings(references: Path, clip_dir: Path):
    """Evaluator settings of :data:`SETTINGS_TOML` over ``references`` and the tiny CLIP folder."""
    from evaluation import settings_from_dict

    base = settings_from_dict({**tomllib.loads(SETTINGS_TOML), "references": str(references)})
    return base.with_overrides(clip_model=f"local-dir:{clip_dir}", clip_pretrained="")


def make_run(root: Path, sampled: dict[int, list[Image.Image]]) -> Path:
    """``root/run`` with config.toml, sample/prompts.json and the PNGs of ``sampled`` (epoch -> images);
    ``root/refs`` holds two reference patterns and ``root/train`` a two-image kohya dataset."""
    for n, seed in enumerate((1, 2)):
        save(pattern_image(seed), root / "refs" / f"ref{n}.png")
    for n, seed in enumerate((20, 21)):
        save(pattern_image(seed), root / "train" / "5_ohwx character" / f"img{n}.png")
        (root / "train" / "5_ohwx character" / f"img{n}.txt").write_text("ohwx, character")
    run = root / "run"
    (run / "sample").mkdir(parents=True)
    (run / "config.toml").write_text(
        f'[saving]\noutput_name = "demo"\nmetadata_trigger_phrase = "ohwx"\n'
        f'[dataset]\ntrain_data_dir = "{(root / "train").as_posix()}"\n')
    entries = [{"index": i, "prompt": p, "negative_prompt": "blurry", "width": 64, "height": 64, "seed": i,
                "steps": 4, "scale": 7.0} for i, p in enumerate(PROMPTS)]
    (run / "sample" / "prompts.json").write_text(json.dumps({"trigger": "ohwx", "prompts": entries}))
    for epoch, images in sampled.items():
        for index, image in enumerate(images):
            save(image, run / "sample" / f"demo_e{epoch:06d}_{index:02d}.png")
    return run
