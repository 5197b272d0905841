"""Build the toy world's models and datasets: ``python -m toyworld.build [--out DIR]``.

What it makes (in ``toyworld/assets/`` unless ``--out`` says otherwise), seeded, so a rebuild on the
same software gives the same files:

* ``model/``: a Stable Diffusion 1.x diffusers folder (``UNet2DConditionModel``, ``AutoencoderKL``,
  ``CLIPTextModel`` with SD 1.x's own CLIP tokenizer, the SD noise schedule). The VAE is trained first,
  on the whole world (a real VAE encodes any image), with reconstruction plus a small KL term. The
  UNet and the text encoder are then trained together on the world *without* the held-out shape and
  colour: epsilon prediction with SD's noise schedule, a noise offset of 0.1, min-SNR weighting, EMA
  weights and 10% empty captions (so classifier-free guidance works).
* ``clip/``: an open_clip model in the ``local-dir:`` layout, trained contrastively on the whole world
  (held-out shape and colour included) with captions that name any subset of a scene's tags; every
  caption a scene satisfies counts as a match, so "grass background, left" means what it says.
* ``data/train/10_zkx star/``: the held-out character (a pink star) in 12 scenes, kohya layout, with
  captions that name the trigger word, the background and the position; ``data/references/``: four
  more images of it.
* ``calibration.json``: evaluator bounds measured for the toy CLIP (:func:`toyworld.probe.calibrate`),
  and a report of what the models know (:func:`check`).

Weights are stored in float16 to keep the committed files small; the loaders cast them to the dtype
they run in. About 16 minutes on 2 CPU cores (the README has the measured time).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from toyworld import world

ASSETS = Path(__file__).with_name("assets")
TEXT_DIM = 64
CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
# SD's noise schedule never reaches pure noise, so a model trained without an offset keeps the initial
# noise's mean colour and cannot follow "night background" (the reason kohya users train with
# noise_offset). At 16x16 latents the noise's mean varies 4x more than at SD's 64x64, hence 0.1.
NOISE_OFFSET = 0.1
log = logging.getLogger("toyworld.build")


@dataclass
class Budget:
    """Optimizer steps per stage (the defaults are what the committed models were built with)."""

    vae_steps: int = 1200
    sd_steps: int = 3200
    clip_steps: int = 1000
    pool: int = 6000

    @classmethod
    def quick(cls) -> "Budget":
        """A few steps of each stage: checks the script runs, makes useless models."""
        return cls(vae_steps=3, sd_steps=3, clip_steps=3, pool=64)


# --- data ---------------------------------------------------------------------------------------------


def render(scenes: Sequence[world.Scene], seed: int) -> torch.Tensor:
    """The scenes drawn with jitter, as a uint8 tensor (N, 3, 64, 64)."""
    import numpy as np

    rng = random.Random(seed)
    arrays = [np.asarray(world.draw(scene, rng)) for scene in scenes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to floats in -1..1, as the VAE sees them."""
    return pixels.float() / 127.5 - 1.0


def scene_pool(n: int, seed: int, held_out: bool) -> list[world.Scene]:
    rng = random.Random(seed)
    return [world.random_scene(rng, held_out=held_out) for _ in range(n)]


def random_tags(rng: random.Random) -> tuple[str, ...]:
    """A non-empty random subset of a caption's tags, in caption order."""
    while True:
        tags = tuple(t for t in ("object", "background", "position") if rng.random() < 0.75)
        if tags:
            return tags


# --- the VAE ------------------------------------------------------------------------------------------


def make_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, sample_size=world.SIZE)
    # Start the posterior narrow (std ~0.02): from a unit std the sampling noise drowns the means, and
    # with a KL weight as small as SD's the encoder takes thousands of steps to shrink it by itself.
    with torch.no_grad():
        vae.quant_conv.bias[4:] = -8.0
    return vae


def train_vae(pixels: torch.Tensor, steps: int, seed: int) -> "torch.nn.Module":
    """Reconstruction (L1 + MSE) with a small KL term, on random 32 px crops (the VAE is convolutional,
    so crops teach it edges and flat colour at a quarter of the cost of whole images)."""
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(pixels), (32,), generator=gen)
        top, left = (int(v) * 8 for v in torch.randint(5, (2,), generator=gen))
        x = to_unit(pixels[idx, :, top:top + 32, left:left + 32])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _anneal(opt, 2e-3, step, steps)
        opt.step()
        _progress("vae", step, steps, loss)
    return vae.eval()


def _anneal(opt: torch.optim.Optimizer, lr: float, step: int, steps: int, warmup: int = 50) -> None:
    """Linear warmup, then cosine decay to a tenth."""
    import math

    scale = min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / max(1, steps)))
    for group in opt.param_groups:
        group["lr"] = lr * scale


def _progress(stage: str, step: int, steps: int, loss: torch.Tensor) -> None:
    if step % 100 == 0 or step == steps - 1:
        log.info("%s step %d/%d loss %.4f", stage, step + 1, steps, loss.item())


@torch.no_grad()
def latent_stats(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior mean and std of every image, and the scaling factor that gives latents unit variance."""
    means, stds = [], []
    for start in range(0, len(pixels), 128):
        dist = vae.encode(to_unit(pixels[start:start + 128])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / torch.sqrt(mean.var() + (std ** 2).mean()))
    return mean, std, scaling


# --- the diffusion model ------------------------------------------------------------------------------


def make_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(2)
    return UNet2DConditionModel(
        sample_size=world.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM)


def clip_text_config(vocab_size: int, width: int, layers: int, heads: int):
    """A CLIP text encoder config of ``width`` on SD 1.x's tokenizer (77 positions, its special tokens)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=width, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def make_text_encoder(vocab_size: int):
    from transformers import CLIPTextModel

    torch.manual_seed(3)
    return CLIPTextModel(clip_text_config(vocab_size, TEXT_DIM, layers=2, heads=4))


def make_tokenizer(folder: Path):
    """SD 1.x's CLIP tokenizer (the real BPE vocabulary, rebuilt from open_clip's copy; no download)."""
    from transformers import CLIPTokenizer

    from training.models import write_clip_tokenizer

    write_clip_tokenizer(folder, pad_token="<|endoftext|>")
    return CLIPTokenizer.from_pretrained(str(folder))


def make_scheduler():
    """The SD 1.x noise schedule (what the trainer trains with), as the pipeline's DDIM sampler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def train_sd(latents: tuple[torch.Tensor, torch.Tensor, float], scenes: Sequence[world.Scene], tokenizer,
             steps: int, seed: int) -> tuple:
    """The UNet and text encoder trained together: epsilon prediction, min-SNR-5 weighting, EMA weights."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    mean, std, scaling = latents
    unet, text_encoder = make_unet(), make_text_encoder(len(tokenizer))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=0.75)
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000)
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    for step in range(steps):
        idx = torch.randint(len(mean), (32,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        captions = ["" if rng.random() < CAPTION_DROPOUT else scenes[int(i)].caption(random_tags(rng))
                    for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(z0.shape, generator=gen)
        noise += NOISE_OFFSET * torch.randn((len(idx), 4, 1, 1), generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        pred = unet(noise_scheduler.add_noise(z0, noise, t), t, text_encoder(ids)[0]).sample
        snr = compute_snr(noise_scheduler, t)
        weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        _anneal(opt, 1e-3, step, steps, warmup=100)
        opt.step()
        ema.step(params)
        _progress("sd", step, steps, loss)
    ema.copy_to(params)
    return unet.eval(), text_encoder.eval()


def save_model(folder: Path, vae, unet, text_encoder, tokenizer, scaling: float) -> None:
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=make_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)


# --- the CLIP -----------------------------------------------------------------------------------------

CLIP_CFG = {
    "embed_dim": 64,
    # A small ResNet tower (open_clip's ModifiedResNet): a ViT of the same cost had learned colours and
    # backgrounds but not shapes after 1200 steps (shape accuracy 0.24, chance 0.20); this one reaches
    # 0.99 in 1000.
    "vision_cfg": {"image_size": world.SIZE, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
PREPROCESS_CFG = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def _tag_ids(scenes: Sequence[world.Scene]) -> torch.Tensor:
    """Each scene's object, background and position as integer ids, (N, 3)."""
    names = {"object": {}, "background": {}, "position": {}}
    return torch.tensor([[names[t].setdefault(s.caption((t,)), len(names[t])) for t in names] for s in scenes])


def _positives(ids: torch.Tensor, tags: Sequence[tuple[str, ...]]) -> torch.Tensor:
    """[image i, caption j]: whether image i shows every tag caption j names (caption j describes image j)."""
    named = torch.tensor([[t in chosen for t in ("object", "background", "position")] for chosen in tags])
    same = ids[:, None, :] == ids[None, :, :]  # [i, j, tag]
    return (same | ~named[None, :, :]).all(dim=2).float()


def train_clip(pixels: torch.Tensor, scenes: Sequence[world.Scene], steps: int, seed: int):
    """Contrastive training in which every caption a scene satisfies is a positive (not only its own)."""
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(4)
    model = CLIP(**CLIP_CFG)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CLIP_CFG["text_cfg"]["context_length"])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (PREPROCESS_CFG["mean"], PREPROCESS_CFG["std"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    ids = _tag_ids(scenes)
    for step in range(steps):
        idx = torch.randint(len(scenes), (128,), generator=gen)
        tags = [random_tags(rng) for _ in range(len(idx))]
        texts = tokenizer([scenes[int(i)].caption(t) for i, t in zip(idx, tags)])
        images = (pixels[idx].float() / 255.0 - mean) / std
        img, txt, scale = model(images, texts)
        logits = scale * img @ txt.T
        positive = _positives(ids[idx], tags)
        loss = (_soft_ce(logits, positive) + _soft_ce(logits.T, positive.T)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _anneal(opt, 1e-3, step, steps, warmup=100)
        opt.step()
        _progress("clip", step, steps, loss)
    return model.eval()


def _soft_ce(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    target = positive / positive.sum(dim=1, keepdim=True)
    return -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()


def save_clip(folder: Path, model) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": CLIP_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))


# --- the character's dataset --------------------------------------------------------------------------

CHARACTER_FOLDER = f"10_{world.TRIGGER} star"


def character_scenes(count: int, seed: int) -> list[world.Scene]:
    """The character in ``count`` scenes, every background and position covered before any repeats."""
    color, shape = world.CHARACTER
    combos = [(b, p) for b in world.BACKGROUNDS for p in world.POSITIONS
              if not world.clashes(color, b)]
    random.Random(seed).shuffle(combos)
    return [world.Scene(shape, color, b, p) for b, p in combos[:count]]


def write_character_data(folder: Path, images: int = 12, references: int = 4, seed: int = 7) -> None:
    """kohya layout ``data/train/10_zkx star/NN.png`` + ``NN.txt``, and ``data/references/refN.png``."""
    rng = random.Random(seed)
    scenes = character_scenes(images + references, seed)
    train = folder / "train" / CHARACTER_FOLDER
    train.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes[:images]):
        world.draw(scene, rng).save(train / f"{i:02d}.png")
        caption = f"{world.TRIGGER}, {scene.background} background, {scene.position}"
        (train / f"{i:02d}.txt").write_text(caption + "\n", encoding="utf-8")
    refs = folder / "references"
    refs.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes[images:]):
        world.draw(scene, rng).save(refs / f"ref{i}.png")


# --- the whole build ----------------------------------------------------------------------------------


def build(out: Path, budget: Budget = Budget(), seed: int = 0,
          say: Callable[[str], None] = print) -> dict[str, float]:
    """Build everything into ``out`` (replacing what is there); returns seconds per stage."""
    torch.manual_seed(seed)
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    timings: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], object]) -> object:
        start = time.monotonic()
        say(f"{name} ...")
        result = fn()
        timings[name] = time.monotonic() - start
        say(f"{name}: {timings[name]:.0f} s")
        return result

    world_scenes = scene_pool(budget.pool, seed + 1, held_out=True)
    world_pixels = stage("render the whole world", lambda: render(world_scenes, seed + 2))
    vae = stage("train the VAE", lambda: train_vae(world_pixels, budget.vae_steps, seed + 3))
    base_scenes = scene_pool(budget.pool, seed + 5, held_out=False)
    base_pixels = stage("render the base world", lambda: render(base_scenes, seed + 6))
    latents = stage("encode latents", lambda: latent_stats(vae, base_pixels))
    tokenizer = make_tokenizer(tmp / "tokenizer_files")
    unet, text_encoder = stage("train the UNet and text encoder",
                               lambda: train_sd(latents, base_scenes, tokenizer, budget.sd_steps, seed + 4))
    save_model(tmp / "model", vae, unet, text_encoder, tokenizer, latents[2])
    shutil.rmtree(tmp / "tokenizer_files")
    clip = stage("train the CLIP", lambda: train_clip(world_pixels, world_scenes, budget.clip_steps, seed + 7))
    save_clip(tmp / "clip", clip)
    write_character_data(tmp / "data")
    stage("calibrate and check", lambda: check(tmp, say))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return timings


def check(folder: Path, say: Callable[[str], None] = print) -> dict:
    """Load what was built the way the product does, write the toy CLIP's evaluator bounds
    (``calibration.json``, see :func:`toyworld.probe.calibrate`) and report what the models know."""
    from PIL import Image

    from evaluation.clip_loader import load_clip
    from evaluation.settings import ClipSettings
    from toyworld import probe

    clip = load_clip(ClipSettings(model=f"local-dir:{folder / 'clip'}", pretrained="", device="cpu"))
    refs = [Image.open(p).convert("RGB") for p in sorted((folder / "data" / "references").glob("*.png"))]
    style = [Image.open(p).convert("RGB") for p in sorted((folder / "data" / "train").rglob("*.png"))]
    bounds = probe.calibrate(clip, refs, style)
    (folder / "calibration.json").write_text(json.dumps(bounds, indent=1) + "\n", encoding="utf-8")
    rng = random.Random(99)
    scenes = [world.random_scene(rng) for _ in range(64)]
    drawn = probe.accuracy(clip, [world.draw(s, rng) for s in scenes], scenes, held_out=True)
    prompts = probe.probe_scenes(24)
    sampled = probe.accuracy(clip, probe.base_samples(folder / "model", [s.caption() for s in prompts]), prompts)
    say(f"toy CLIP on drawn scenes: {drawn}")
    say(f"base model samples, recognised by the toy CLIP: {sampled}")
    say(f"evaluator bounds for the toy CLIP: {json.dumps(bounds)}")
    return bounds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toyworld.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="output folder (default: toyworld/assets)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: checks the script, not the models")
    parser.add_argument("--check", action="store_true", help="only calibrate and check the models already in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.check:
        check(args.out)
        return 0
    start = time.monotonic()
    timings = build(args.out, Budget.quick() if args.quick else Budget())
    total = time.monotonic() - start
    print(json.dumps({**{k: round(v) for k, v in timings.items()}, "total": round(total)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
