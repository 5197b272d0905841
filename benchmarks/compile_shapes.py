"""How many batch shapes a trial's compiled step compiles, for a config's bucket settings and a dataset.

Every distinct (batch, height, width) of the step is one compilation (a minute or two for SD 1.5 on a
bare machine, seconds from the kernel cache). Printed: the buckets, the shapes as sd-scripts batches
them (a bucket's short last batch is a shape of its own) and as the trainer batches them (short last
batches padded to the batch size, so one shape per bucket), and what padding costs: filler rows per
epoch, whose loss weighs 0. With ``--compile`` it also runs the trainer's compiled UNet step
(``training.fast.UnetLoss``, the ``aot_eager`` backend, on the CPU) over every padded shape with the tiny
UNet of ``training/tiny.py`` at the shapes' latent sizes, and prints how many graphs torch compiled:
one per shape with static shapes, two or three with the automatic dynamic shapes the trainer uses.

Without ``DATA_DIR`` the dataset is a made-up but realistic character dataset of ``--images`` images of
mixed aspect ratios (``realistic_sizes``); with it, that folder (kohya layout) is scanned.

    python benchmarks/compile_shapes.py [DATA_DIR] [--config configs/base.toml] [--images 400]
                                        [--repeats 1] [--seed 0] [--compile]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

ROOT = Path(__file__).resolve().parents[1]

# (share of the dataset, (width, height) choices): where the images of a character dataset come from.
SOURCES = [
    (0.35, [(3024, 4032), (3024, 4032), (4032, 3024)]),  # phone photos, mostly portrait
    (0.15, [(1080, 1920), (1920, 1080)]),  # phone screenshots and video frames
    (0.15, [(1024, 1024), (1080, 1080), (2048, 2048)]),  # square: social media, generated
    (0.10, [(4000, 6000), (6000, 4000)]),  # camera 2:3
    (0.10, [(832, 1216), (1216, 832), (896, 1152), (768, 1344)]),  # SDXL-sized renders
]
CROPPED = 0.15  # the rest: crops the user cut by hand, any size from 512 to 2048 a side


def realistic_sizes(images: int, seed: int = 0) -> list[tuple[int, int]]:
    """(width, height) of ``images`` images: the shares of ``SOURCES``, the rest hand crops; seeded."""
    rng = random.Random(seed)
    sizes = []
    for share, choices in SOURCES:
        sizes += [rng.choice(choices) for _ in range(round(share * images))]
    while len(sizes) < images:
        sizes.append((rng.randint(512, 2048), rng.randint(512, 2048)))
    return sizes[:images]


def synthetic_items(sizes: list[tuple[int, int]], repeats: int) -> list:
    from training.data import ImageItem

    return [ImageItem(path=Path(f"{repeats}_ohwx character/img{i:04d}.png"), caption="ohwx", caption_missing=False,
                      repeats=repeats, class_tokens="ohwx character", width=w, height=h)
            for i, (w, h) in enumerate(sizes)]


def shape_report(items: list, cfg) -> dict:
    """Buckets, step shapes unpadded (sd-scripts) and padded (the trainer), and padding's filler rows."""
    from training.data import DataOptions, TrainDataset

    dataset = TrainDataset(items, DataOptions.from_config(cfg))
    batch = cfg.train_batch_size
    unpadded, padded = dataset.step_shapes(batch, padded=False), dataset.step_shapes(batch)
    examples = dataset.num_examples
    return {"images": len(items), "examples_per_epoch": examples, "batch_size": batch,
            "buckets": len(set(dataset.buckets)), "shapes_unpadded": len(unpadded), "shapes_padded": len(padded),
            "filler_rows_per_epoch": sum(padded.values()) * batch - examples}


def compiled_graphs(shapes: list[tuple[int, int, int]]) -> tuple[int, float]:
    """(graphs compiled, seconds compiling) when the trainer's compiled UNet step meets ``shapes`` in turn."""
    import torch

    from training.fast import UnetLoss, release_compiled
    from training.tiny import tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet().requires_grad_(False)
    for name, param in unet.named_parameters():
        param.requires_grad_("attn" in name and name.endswith("to_q.weight"))  # something to train
    step = UnetLoss(unet, None, torch.device("cpu"), compile=True, backend="aot_eager")
    cfg = unet.config
    for batch, width, height in shapes:
        noisy = torch.randn(batch, cfg.in_channels, height // 8, width // 8)
        loss = step(noisy, torch.randint(0, 1000, (batch,)), torch.randn(batch, 77, cfg.cross_attention_dim), None,
                    torch.randn_like(noisy), torch.ones(batch))
        loss.backward()
    release_compiled()
    return sum(entry["graphs"] for entry in step.compiles), step.compile_seconds


def main(argv: Optional[list[str]] = None) -> int:
    from training.config import load_training_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", nargs="?", help="a kohya dataset folder (default: the made-up layout)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "base.toml"))
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="also count the graphs the compiled step compiles")
    args = parser.parse_args(argv)
    cfg = load_training_config(args.config)
    if args.data_dir:
        from training.data import scan_dataset

        items, what = scan_dataset(args.data_dir, cfg.caption_extension), args.data_dir
    else:
        items = synthetic_items(realistic_sizes(args.images, args.seed), args.repeats)
        what = f"{args.images} made-up images of mixed aspect ratios x {args.repeats} repeats (seed {args.seed})"
    report = shape_report(items, cfg)
    if args.compile:
        from training.data import DataOptions, TrainDataset

        dataset = TrainDataset(items, DataOptions.from_config(cfg))
        order = sorted(dataset.step_shapes(cfg.train_batch_size).items(), key=lambda kv: -kv[1])
        report["graphs"], report["compile_seconds"] = compiled_graphs([shape for shape, _ in order])
    print(f"dataset: {what}; {Path(args.config).name}: resolution {cfg.resolution}, enable_bucket "
          f"{cfg.enable_bucket}, bucket_no_upscale {cfg.bucket_no_upscale}, batch {report['batch_size']}")
    print(f"buckets: {report['buckets']}")
    print(f"step shapes to compile, short last batches as they are (sd-scripts): {report['shapes_unpadded']}")
    print(f"step shapes to compile, short last batches padded (lora-search): {report['shapes_padded']}")
    print(f"padding: {report['filler_rows_per_epoch']} filler rows per epoch next to "
          f"{report['examples_per_epoch']} examples")
    if args.compile:
        print(f"graphs the compiled step compiled for those {report['shapes_padded']} shapes (tiny UNet, aot_eager, "
              f"most frequent shape first): {report['graphs']} in {report['compile_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
