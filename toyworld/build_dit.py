"""Build the toy world's SD3 model: ``python -m toyworld.build_dit [--out DIR] [--steps N]``.

It makes ``toyworld/assets/sd3/``, a ``StableDiffusion3Pipeline`` diffusers folder, from the SD 1.x toy
model's trained parts (so run ``python -m toyworld.build`` first), seeded:

* the VAE of ``model/vae`` as it is (4 latent channels), with a ``shift_factor``: the mean of the
  world's latents, so that ``(z - shift) * scale`` (the trainer's normalisation, undone by the
  pipeline's decode) has zero mean and unit variance;
* ``text_encoder``: the SD 1.x toy model's trained ``CLIPTextModel`` as a ``CLIPTextModelWithProjection``
  with an identity projection; ``text_encoder_2``: a small random ``CLIPTextModelWithProjection`` (SD3's
  pipeline needs two CLIP encoders; the second one adds nothing the first does not know, so it is kept
  tiny), both with SD 1.x's tokenizer; ``text_encoder_3``: a one-layer random T5 encoder
  (:func:`training.tiny_dit.tiny_t5`) read to :data:`T5_TOKENS` tokens, so the folder loads with no
  extra arguments;
* a small ``SD3Transformer2DModel`` (patch 2 on 16x16 latents: 64 image tokens, 4 joint blocks of width
  64) trained with the trainer's own flow-matching loss (:meth:`training.dit.SD3Family.training_loss`)
  on the world *without* the held-out shape and colour, with 10% empty captions and EMA weights; the
  text encoders are frozen, as SD3's are. Every caption is encoded once, up front.

Sampling uses the pipeline's ``FlowMatchEulerDiscreteScheduler`` at :data:`SAMPLING_SHIFT`. Weights are
stored in float16. The README has the measured build time.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from toyworld import build, world

ASSETS = build.ASSETS
CONTEXT_DIM_2 = 8  # width of the second (random) CLIP encoder
WIDTH_HEADS = (4, 16)  # attention heads x head width of the transformer
LAYERS = 4
SAMPLING_SHIFT = 3.0  # SD3's own; measured: object 0.21 at 3.0, 0.08 at 1.0 (CFG 5, 16 steps)
# T5 tokens after the 77 CLIP tokens: the model is trained and sampled with this many
# (t5xxl_max_token_length in a training config); SD3's 256 would put 248 more tokens in every attention.
T5_TOKENS = 8
log = logging.getLogger("toyworld.build_dit")


def load_sd1_parts(model: Path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32).eval()
    text = CLIPTextModel.from_pretrained(model / "text_encoder", torch_dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    return vae, text, tokenizer


def with_projection(text) -> torch.nn.Module:
    """The SD 1.x ``CLIPTextModel`` as a ``CLIPTextModelWithProjection`` whose projection is the identity."""
    from transformers import CLIPTextModelWithProjection

    config = text.config
    config.projection_dim = config.hidden_size
    projected = CLIPTextModelWithProjection(config)
    projected.text_model.load_state_dict(text.state_dict())
    with torch.no_grad():
        projected.text_projection.weight.copy_(torch.eye(config.hidden_size))
    return projected.eval()


def second_text_encoder(vocab_size: int):
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(11)
    return CLIPTextModelWithProjection(build.clip_text_config(vocab_size, CONTEXT_DIM_2, layers=1, heads=2)).eval()


def make_transformer(context_dim: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(12)
    heads, head_dim = WIDTH_HEADS
    return SD3Transformer2DModel(
        sample_size=world.SIZE // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=LAYERS,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=context_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=context_dim, pos_embed_max_size=16)


def make_scheduler(shift: float = SAMPLING_SHIFT):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def assemble(vae, text, tokenizer, transformer=None):
    """The SD3 pipeline of these parts (a fresh transformer unless one is given)."""
    from diffusers import StableDiffusion3Pipeline

    from training.tiny_dit import tiny_t5

    text_1 = with_projection(text)
    text_2 = second_text_encoder(len(tokenizer))
    context_dim = text_1.config.projection_dim + CONTEXT_DIM_2
    t5, t5_tokenizer = tiny_t5(seed=13, width=context_dim)
    return StableDiffusion3Pipeline(
        transformer=transformer or make_transformer(context_dim), scheduler=make_scheduler(), vae=vae,
        text_encoder=text_1, tokenizer=tokenizer, text_encoder_2=text_2, tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)


_TAG_SUBSETS = [tuple(t for t, keep in zip(("object", "background", "position"), mask) if keep)
                for mask in ((a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)) if any(mask)]


def train_transformer(pipe, latents: torch.Tensor, scenes: Sequence[world.Scene], steps: int, seed: int,
                      lr: float = 1e-3, batch: int = 32):
    """Flow matching with the trainer's SD3 loss, 10% empty captions, EMA weights; text encoders frozen."""
    from diffusers.training_utils import EMAModel

    from training.dit import DitConditioning, SD3Family

    fam = SD3Family(t5_max_length=T5_TOKENS)
    transformer = pipe.transformer.train()
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=0.75)
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    cache: dict = {}  # caption -> its conditioning (the text encoders are frozen)
    every = sorted({""} | {s.caption(tags) for s in scenes for tags in _TAG_SUBSETS})
    for start in range(0, len(every), 256):
        cache.update(zip(every[start:start + 256], fam.encode_captions(pipe, every[start:start + 256]).split()))
    for step in range(steps):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        captions = ["" if rng.random() < build.CAPTION_DROPOUT else scenes[int(i)].caption(build.random_tags(rng))
                    for i in idx]
        conditioning = DitConditioning.join([cache[c] for c in captions])
        loss = fam.training_loss(transformer, latents[idx], conditioning, generator=gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        build._anneal(opt, lr, step, steps, warmup=100)
        opt.step()
        ema.step(params)
        build._progress("sd3", step, steps, loss)
    ema.copy_to(params)
    return transformer.eval()


def build_sd3(out: Path, model: Path, steps: int, pool: int = 6000, seed: int = 20,
              say: Callable[[str], None] = print) -> dict[str, float]:
    """Build ``out`` (replacing it) from the SD 1.x toy model at ``model``; returns seconds per stage."""
    timings: dict[str, float] = {}
    start = time.monotonic()
    vae, text, tokenizer = load_sd1_parts(model)
    scenes = build.scene_pool(pool, seed + 1, held_out=False)
    mean, std, _ = build.latent_stats(vae, build.render(scenes, seed + 2))
    shift = round(float(mean.mean()), 4)
    vae.register_to_config(shift_factor=shift)
    gen = torch.Generator().manual_seed(seed + 3)
    latents = (mean + std * torch.randn(mean.shape, generator=gen) - shift) * vae.config.scaling_factor
    say(f"latents: shift {shift}, scale {vae.config.scaling_factor:.4f}, normalised mean "
        f"{latents.mean():.3f} std {latents.std():.3f}")
    timings["latents"] = time.monotonic() - start
    start = time.monotonic()
    pipe = assemble(vae, text, tokenizer)
    for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.requires_grad_(False)
    train_transformer(pipe, latents, scenes, steps, seed + 4)
    timings["transformer"] = time.monotonic() - start
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return timings


def check(folder: Path, clip_folder: Path = ASSETS / "clip", count: int = 24,
          say: Callable[[str], None] = print) -> object:
    """What the SD3 toy model draws for prompts of its world, recognised by the toy CLIP."""
    from evaluation.clip_loader import load_clip
    from evaluation.settings import ClipSettings
    from toyworld import probe

    clip = load_clip(ClipSettings(model=f"local-dir:{clip_folder}", pretrained="", device="cpu"))
    prompts = probe.probe_scenes(count)
    images = probe.dit_samples(folder, [s.caption() for s in prompts], t5_tokens=T5_TOKENS)
    sampled = probe.accuracy(clip, images, prompts)
    say(f"SD3 toy model samples, recognised by the toy CLIP: {sampled}")
    return sampled


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toyworld.build_dit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS / "sd3", help="output folder (default: toyworld/assets/sd3)")
    parser.add_argument("--model", type=Path, default=ASSETS / "model", help="the SD 1.x toy model to take parts from")
    parser.add_argument("--steps", type=int, default=3000, help="transformer optimizer steps (batch 32)")
    parser.add_argument("--check", action="store_true", help="only check the model already in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not args.check:
        timings = build_sd3(args.out, args.model, args.steps)
        print(json.dumps({k: round(v) for k, v in timings.items()}))
    check(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
