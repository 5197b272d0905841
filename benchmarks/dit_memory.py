"""Peak GPU memory of a LoRA training step on SD3.5 Large or Z-Image, next to the VRAM estimate.

The transformer is the real architecture with random weights (SD3.5 Large: 38 blocks of width 2432;
Z-Image: 30 layers and 2+2 refiners of width 3840), built on the GPU in bf16, optionally stored in fp8
(``--fp8-base``), with :class:`training.dit_lora.DitLora` on every block Linear (float32), bf16 autocast,
cached-latent-sized random inputs and random caption features of the real widths (text encoders and VAE
are not loaded: the built-in trainer caches their outputs). Each configuration runs ``--steps`` optimizer
steps; the peak of allocated memory over them is printed beside ``training.vram.estimate_vram`` for the
same settings, with the ``CalibrationPoint`` line to add to ``training/vram.py`` once it is measured.

``--smoke`` runs tiny models on the CPU to check the script end to end (no memory figures).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from training.config import TrainingConfig  # noqa: E402
from training.dit import DitConditioning, SD3Family, ZImageFamily, store_base_in_fp8  # noqa: E402
from training.dit_lora import DitLora  # noqa: E402
from training.families import DIT_SIZES  # noqa: E402
from training.vram import estimate_vram  # noqa: E402

GIB = 1024 ** 3
SD35_LARGE = dict(sample_size=128, num_layers=38, attention_head_dim=64, num_attention_heads=38,
                  joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
                  pos_embed_max_size=192, qk_norm="rms_norm")


def build(arch: str, device: torch.device, smoke: bool):
    """The family and its random-weight transformer in bf16 (float32 for ``smoke``)."""
    from diffusers import SD3Transformer2DModel, ZImageTransformer2DModel

    from training.tiny_dit import tiny_sd3_transformer, tiny_zimage_transformer

    if smoke:
        return (SD3Family(), tiny_sd3_transformer()) if arch == "sd3" else (ZImageFamily(), tiny_zimage_transformer())
    with torch.device(device):
        model = SD3Transformer2DModel(**SD35_LARGE) if arch == "sd3" else ZImageTransformer2DModel()
    return (SD3Family() if arch == "sd3" else ZImageFamily()), model.to(torch.bfloat16)


def conditioning(arch: str, model, batch: int, device: torch.device, dtype: torch.dtype,
                 smoke: bool) -> DitConditioning:
    """Random caption features of the model's widths and the estimate's caption lengths (8 for ``smoke``)."""
    tokens = 8 if smoke else DIT_SIZES[arch].caption_tokens
    if arch == "sd3":
        return DitConditioning(torch.randn(batch, tokens, model.config.joint_attention_dim, device=device, dtype=dtype),
                               torch.randn(batch, model.config.pooled_projection_dim, device=device, dtype=dtype))
    return DitConditioning([torch.randn(tokens, model.config.cap_feat_dim, device=device, dtype=dtype)
                            for _ in range(batch)])


def optimizer_for(name: str, params: list):
    if name == "AdamW8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def run(arch: str, resolution: int, batch: int, dim: int, optimizer: str, checkpointing: bool, fp8: bool,
        steps: int, device: torch.device, smoke: bool) -> tuple[float, float]:
    """Peak allocated GiB over ``steps`` training steps (0 on the CPU), and seconds per step after the first."""
    import time

    fam, model = build(arch, device, smoke)
    if fp8:
        store_base_in_fp8(model, torch.bfloat16)
    lora = DitLora(model, fam, dim=dim, alpha=dim)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    opt = optimizer_for(optimizer, lora.parameters())
    side = resolution // 8 if not smoke else 8
    dtype = torch.bfloat16 if fp8 or not smoke else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = None
    for step in range(steps):
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        latents = torch.randn(batch, 16, side, side, device=device)
        noise = torch.randn_like(latents)
        sigmas = fam.sample_noise_levels(batch, device)
        noisy, target = fam.noisy_input_and_target(latents, noise, sigmas)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cond = conditioning(arch, model, batch, device, dtype, smoke)
            prediction = fam.predict(model, noisy.to(dtype), sigmas, cond)
        fam.loss(prediction, target, sigmas).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - started) / (steps - 1) if started is not None else float("nan")
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else 0.0
    del model, lora, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return peak, per_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("sd3", "zimage", "both"), default="both")
    parser.add_argument("--resolutions", default="1024")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--optimizer", choices=("AdamW", "AdamW8bit"), default="AdamW8bit")
    parser.add_argument("--checkpointing", choices=("on", "off", "both"), default="both")
    parser.add_argument("--fp8-base", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    archs = ("sd3", "zimage") if args.arch == "both" else (args.arch,)
    checkpointing = {"on": (True,), "off": (False,), "both": (False, True)}[args.checkpointing]
    grid = itertools.product(archs, [int(r) for r in args.resolutions.split(",")],
                             [int(b) for b in args.batches.split(",")], checkpointing)
    print("arch    res batch gc  measured GiB  estimate GiB  s/step")
    for arch, resolution, batch, gc in grid:
        measured, per_step = run(arch, resolution, batch, args.dim, args.optimizer, gc, args.fp8_base, args.steps, device,
                       args.smoke)
        cfg = TrainingConfig(resolution=str(resolution), train_batch_size=batch, network_dim=args.dim,
                             network_alpha=args.dim, optimizer_type=args.optimizer, mixed_precision="bf16",
                             gradient_checkpointing=gc, fp8_base=args.fp8_base, network_train_unet_only=True,
                             cache_latents=True)
        estimate = estimate_vram(cfg, arch).total_gib
        print(f"{arch:6} {resolution:5} {batch:5} {'on' if gc else 'off':3} {measured:12.2f} {estimate:13.2f} "
              f"{per_step:7.3f}")
        if measured:
            print(f'    CalibrationPoint("{arch}", {resolution}, {batch}, {args.dim}, "{args.optimizer}", {gc}, '
                  f'{measured:.1f}, "{torch.cuda.get_device_name()}, random-weight transformer, bf16'
                  f'{", fp8 base" if args.fp8_base else ""}, latents and captions cached"),')
    return 0


if __name__ == "__main__":
    sys.exit(main())
