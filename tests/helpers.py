"""Small helpers shared by several test files: a benchmark script imported as a module, an LR curve, a
tiny kohya dataset."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def loaded_benchmark(filename: str) -> Iterator[ModuleType]:
    """``benchmarks/<filename>`` imported as a module for the duration (use as a fixture body)."""
    spec = importlib.util.spec_from_file_location(f"{Path(filename).stem}_benchmark", BENCHMARKS / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def lr_curve(cfg, steps: int) -> list[float]:
    """The learning rate ``build_scheduler`` gives at each of ``steps`` optimizer steps for ``cfg``.

    The optimizer is plain SGD: a scheduler only sets each group's ``lr``, so the curve is the same for
    every optimizer type (8-bit AdamW included, which needs no GPU here)."""
    import torch

    from training.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = build_scheduler(cfg, opt, steps)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def write_dataset(root: Path, images: int = 2, repeats: int = 1, name: str = "ohwx cat",
                  size: tuple[int, int] = (64, 64)) -> Path:
    """A kohya dataset ``root/{repeats}_{name}/`` of random RGB images with ``.txt`` captions."""
    import numpy as np
    from PIL import Image

    folder = root / f"{repeats}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"ohwx, cat, tag{i}, red", encoding="utf-8")
    return root
