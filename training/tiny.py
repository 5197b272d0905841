"""Tiny random-weight Stable Diffusion models, saved to disk so the real loaders read them.

Used by the tests and the CPU smoke mode of benchmarks/train_step.py; the images such a model makes are
noise (the demo uses the pretrained toy world in ``toyworld/`` instead).

Everything here is random-weight and offline: the tokenizer's ``vocab.json``/``merges.txt`` are the 256
byte-level characters, their ``</w>`` forms and the two special tokens (no merges), which is all a
``CLIPTokenizer`` needs. ``save_tiny_sd15(path)`` writes a diffusers folder (``model_index.json`` plus
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that ``StableDiffusionPipeline``
and ``training.models.load_models`` both load. ``save_tiny_sdxl(path)`` does the same for SDXL.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.models import byte_unicode_chars

TEXT_DIM = 32  # hidden size of the tiny (first) text encoder and the SD 1.x UNet's cross-attention dim
TEXT_DIM_2 = 48  # SDXL's second encoder differs in width, as in the real model (768 and 1280)


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` for a byte-level CLIP tokenizer with no merges."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_unicode_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


def tiny_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>"):
    """A ``CLIPTokenizer`` built offline from files written into ``folder``."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder)
    return CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"),
                         pad_token=pad_token, model_max_length=77)


def tiny_unet(sdxl: bool = False):
    """A two-block ``UNet2DConditionModel`` (one cross-attention block down, one up)."""
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM if not sdxl else TEXT_DIM + TEXT_DIM_2,
    )
    if sdxl:
        kwargs.update(
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=TEXT_DIM_2 + 6 * 8,
            use_linear_projection=True, transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
        )
    torch.manual_seed(0)
    return UNet2DConditionModel(**kwargs)


def tiny_vae():
    """A three-block ``AutoencoderKL`` (latents at a quarter of the image size, 16x16 for 64 px)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64,
    )


def tiny_text_encoder(with_projection: bool = False, seed: int = 2, hidden: int = TEXT_DIM):
    """A two-layer CLIP text model with the tokenizer's vocabulary size."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=514, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_act="gelu",
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_scheduler():
    """The SD training noise schedule (scaled-linear betas, 1000 steps)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_tiny_sd15(tokenizer_dir: str | Path):
    """A tiny ``StableDiffusionPipeline`` (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=tiny_unet(), vae=tiny_vae(), text_encoder=tiny_text_encoder(),
        tokenizer=tiny_tokenizer(tokenizer_dir), scheduler=tiny_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_sd15(path: str | Path) -> Path:
    """Save a tiny SD 1.x pipeline as a diffusers folder at ``path`` and return it."""
    path = Path(path)
    pipe = build_tiny_sd15(path.parent / f".{path.name}_tokenizer")
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sdxl(tokenizer_dir: str | Path):
    """A tiny ``StableDiffusionXLPipeline`` with two text encoders."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        unet=tiny_unet(sdxl=True), vae=tiny_vae(),
        text_encoder=tiny_text_encoder(seed=2), text_encoder_2=tiny_text_encoder(with_projection=True, seed=3, hidden=TEXT_DIM_2),
        tokenizer=tiny_tokenizer(tokenizer_dir), tokenizer_2=tiny_tokenizer(tokenizer_dir, pad_token="!"),
        scheduler=tiny_scheduler(), force_zeros_for_empty_prompt=True,
    )


def save_tiny_sdxl(path: str | Path) -> Path:
    """Save a tiny SDXL pipeline as a diffusers folder at ``path`` and return it."""
    path = Path(path)
    pipe = build_tiny_sdxl(path.parent / f".{path.name}_tokenizer")
    pipe.save_pretrained(path, safe_serialization=True)
    return path
