"""``lora-search demo``: the whole pipeline, end to end, on the CPU in a few minutes.

It builds a tiny Stable Diffusion model and a tiny CLIP (random weights, saved under the demo folder
and loaded through the same loaders as a real checkpoint), draws a small synthetic character dataset
with captions and reference images, writes demo configs next to them, and runs a real short study:
sampling, constraint rejections, training with the built-in trainer, CLIP scoring of every sampled
epoch, pruning, export. The tiny model's images are noise; real use needs a real checkpoint.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import toml

from search.settings import load_settings

TRIGGER = "demochar"
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
POSES = ("standing", "waving", "arms up", "walking", "sitting", "jumping", "pointing", "stretching")
SAFE_PARAMS = {"network_dim": 8, "network_alpha_ratio": 0.5, "network_dropout": 0.1, "learning_rate": 1e-4,
               "text_encoder_lr": 5e-5, "lr_scheduler": "cosine", "max_train_epochs": 3, "min_snr_gamma": 5,
               "optimizer_type": "AdamW", "gradient_accumulation_steps": 2, "lr_warmup_steps": 100}
SCENES = ("park", "city street", "beach", "forest", "room", "snow", "desert", "studio")


@dataclass
class DemoPaths:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def clip(self) -> Path:
        return self.root / "clip"

    @property
    def train(self) -> Path:
        return self.root / "data" / "train"

    @property
    def references(self) -> Path:
        return self.root / "data" / "references"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def study_config(self) -> Path:
        return self.configs / "study.toml"

    @property
    def export(self) -> Path:
        return self.root / "best.toml"


def _background(size: int, scene: int, rng: random.Random):
    from PIL import Image, ImageDraw

    top = tuple(rng.randrange(40, 230) for _ in range(3))
    bottom = tuple(rng.randrange(20, 200) for _ in range(3))
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for y in range(size):
        t = y / (size - 1)
        draw.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(3 + scene % 4):  # scenery blobs so backgrounds differ in content, not only colour
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(size // 16, size // 6)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def draw_character(size: int, pose: int, scene: int, seed: int, plain: bool = False):
    """The demo character: orange suit, blue hair, a star on the chest; arms set by ``pose``."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (200, 200, 205)) if plain else _background(size, scene, rng)
    draw = ImageDraw.Draw(image)
    s = size / 64
    cx = size / 2 + (0 if plain else rng.uniform(-6, 6) * s)
    top = size * 0.18 + (0 if plain else rng.uniform(-3, 3) * s)
    head, body_w, body_h = 7 * s, 10 * s, 18 * s
    draw.ellipse([cx - head, top, cx + head, top + 2 * head], fill=(250, 212, 176))
    draw.chord([cx - head, top - 2 * s, cx + head, top + 1.2 * head], 180, 360, fill=(30, 60, 200))
    for ex in (-3, 3):
        draw.ellipse([cx + ex * s - s, top + head - s, cx + ex * s + s, top + head + s], fill=(10, 10, 60))
    body_top = top + 2 * head
    draw.rectangle([cx - body_w / 2, body_top, cx + body_w / 2, body_top + body_h], fill=(240, 120, 30))
    draw.regular_polygon((cx, body_top + body_h / 3, 3 * s), 5, fill=(255, 230, 40))
    angle = math.radians(-60 + pose * 20)
    for side in (-1, 1):
        x0, y0 = cx + side * body_w / 2, body_top + 3 * s
        x1 = x0 + side * 11 * s * math.cos(angle)
        y1 = y0 + 11 * s * math.sin(angle * side if pose % 2 else angle)
        draw.line([(x0, y0), (x1, y1)], fill=(240, 120, 30), width=max(1, int(3 * s)))
    leg = 2 * s + (pose % 3) * s
    for side in (-1, 1):
        x = cx + side * leg
        draw.line([(x, body_top + body_h), (x + side * (pose % 2) * 3 * s, body_top + body_h + 12 * s)],
                  fill=(40, 40, 90), width=max(1, int(3 * s)))
    return image


def write_dataset(paths: DemoPaths, images: int = 8, references: int = 3, size: int = 64) -> None:
    """kohya layout ``data/train/2_demochar character/`` with .txt captions, and reference images."""
    folder = paths.train / f"2_{TRIGGER} character"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        pose, scene = i % len(POSES), (i * 3) % len(SCENES)
        draw_character(size, pose, scene, seed=i).save(folder / f"{i:02d}.png")
        caption = f"{TRIGGER}, a 3d animated character, {POSES[pose]}, {SCENES[scene]}"
        (folder / f"{i:02d}.txt").write_text(caption + "\n", encoding="utf-8")
    paths.references.mkdir(parents=True, exist_ok=True)
    for i in range(references):
        draw_character(size, pose=i, scene=0, seed=100 + i, plain=True).save(paths.references / f"ref{i}.png")


def write_prompts(path: Path, size: int = 64, steps: int = 4) -> None:
    lines = [f"{{trigger}}, a 3d animated character, {pose}, {scene} --n blurry --w {size} --h {size} "
             f"--d {i + 1} --s {steps} --l 5" for i, (pose, scene) in enumerate(zip(POSES[:4], SCENES[:4]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# demo validation prompts\n" + "\n".join(lines) + "\n", encoding="utf-8")


def _demo_base(paths: DemoPaths) -> dict:
    """The shipped base config, pointed at the demo model and data, shrunk to CPU size."""
    base = toml.loads((REPO_CONFIGS / "base.toml").read_text())
    base["model"]["pretrained_model_name_or_path"] = str(paths.model)
    base["dataset"].update(train_data_dir=str(paths.train), resolution="64,64", enable_bucket=False,
                           cache_latents=True, cache_latents_to_disk=True)
    base["training"].update(train_batch_size=2, mixed_precision="no", max_data_loader_n_workers=0,
                            max_train_epochs=4)
    base["saving"].update(output_dir=str(paths.root / "train"), output_name="demo", save_every_n_epochs=1,
                          sample_every_n_epochs=1, sample_prompts=str(paths.configs / "prompts.txt"),
                          metadata_trigger_phrase=TRIGGER, sample_sampler="euler")
    return base


def write_configs(paths: DemoPaths, n_trials: int) -> None:
    configs = paths.configs
    configs.mkdir(parents=True, exist_ok=True)
    write_prompts(configs / "prompts.txt")
    (configs / "base.toml").write_text("# lora-search demo: tiny model, CPU\n" + toml.dumps(_demo_base(paths)))
    space = toml.loads((REPO_CONFIGS / "search_space.toml").read_text())
    space["max_train_epochs"] = {"choices": [2, 3, 4]}  # CPU minutes, not GPU hours
    space["optimizer_type"] = {"choices": ["AdamW"]}  # 8-bit AdamW needs a CUDA GPU
    space["network_dim"] = {"choices": [4, 8, 256]}  # 256 shows constraint 3 firing
    (configs / "search_space.toml").write_text(toml.dumps(space))
    evaluator = toml.loads((REPO_CONFIGS / "evaluator.toml").read_text())
    evaluator["references"] = str(paths.references)
    evaluator["clip"].update(model=f"local-dir:{paths.clip}", pretrained="", device="cpu")
    (configs / "evaluator.toml").write_text(toml.dumps(evaluator))
    study = {
        "study": {"name": "demo", "n_trials": n_trials, "runs_dir": str(paths.root), "seed": 1,
                  "base_config": str(configs / "base.toml"), "search_space": str(configs / "search_space.toml"),
                  "evaluator_config": str(configs / "evaluator.toml")},
        "sampler": {"n_startup_trials": 5},
        "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
        "backend": {"type": "builtin"},
        "scorer": {"type": "clip"},
    }
    paths.study_config.write_text("# lora-search demo study\n" + toml.dumps(study))


def prepare(root: Path, n_trials: int, say: Callable[[str], None]) -> DemoPaths:
    """Build (or reuse) the tiny models and data and write the demo configs."""
    from evaluation.tiny import save_tiny_clip
    from training.tiny import save_tiny_sd15

    paths = DemoPaths(root)
    if not (paths.model / "model_index.json").exists():
        say(f"building a tiny Stable Diffusion model (random weights) in {paths.model}")
        save_tiny_sd15(paths.model)
    if not (paths.clip / "open_clip_model.safetensors").exists():
        say(f"building a tiny CLIP (random weights) in {paths.clip}")
        save_tiny_clip(paths.clip)
    say(f"drawing a synthetic character dataset in {paths.train}")
    write_dataset(paths)
    write_configs(paths, n_trials)
    return paths


def run_demo(root: Path, n_trials: int = 3, say: Callable[[str], None] = print):
    """Prepare everything, run the study in the foreground, export the best trial; returns the paths."""
    from search.export import export_trial
    from search.status import status_text
    from search.worker import Worker

    paths = prepare(root, n_trials, say)
    settings = load_settings(paths.study_config)
    say(f"running study 'demo': {n_trials} trained trials on the CPU")
    worker = Worker(settings)
    if not worker.study.trials:
        # the first trial is deliberately unsafe (rank 256 for a few epochs), to show a rejection
        worker.study.enqueue_trial({**SAFE_PARAMS, "network_dim": 256, "network_alpha_ratio": 0.5})
    worker.run()
    say(status_text(worker.study, n_trials))
    export_trial(worker.study, worker.base, paths.export)
    return paths
