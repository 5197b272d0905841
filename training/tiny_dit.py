"""Tiny random-weight SD3 and Z-Image pipelines, saved as diffusers folders for tests.

The sizes are the smallest that build and run in diffusers 0.42.1 (see ``notes/dit.md``): an SD3
transformer of 2 joint blocks (4 heads x 8), CLIP-L/G of width 32/48 and a T5 encoder of width 64;
a Z-Image transformer of 2 layers plus one noise and one context refiner (2 heads x 16) and a Qwen3
text model of width 16. Tokenizers are built offline: CLIP from :mod:`training.tiny`, T5 from an
in-memory unigram vocabulary, Qwen from the byte-level characters with no merges and a two-line chat
template. The images such models make are noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.models import byte_unicode_chars
from training.tiny import TEXT_DIM, TEXT_DIM_2, tiny_text_encoder, tiny_tokenizer

T5_DIM = 64
QWEN_DIM = 16
LATENT_CHANNELS = 16
# SD3's VAE normalisation (sd-scripts library/sd3_models.py) and the Flux VAE's that Z-Image uses.
SD3_VAE_SCALING = (1.5305, 0.0609)
FLUX_VAE_SCALING = (0.3611, 0.1159)
_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_sd3_transformer(seed: int = 0, dual_attention_layers: tuple[int, ...] = ()):
    """A two-block ``SD3Transformer2DModel`` (90.8 k parameters); latents up to 64x64.

    With qk-norm it has SD3.5 Large's layout; ``dual_attention_layers=(0,)`` gives SD3.5 Medium's
    (a second image-only attention, ``attn2``, in those blocks).
    """
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_DIM, caption_projection_dim=32,
        pooled_projection_dim=TEXT_DIM + TEXT_DIM_2, pos_embed_max_size=32, qk_norm="rms_norm",
        dual_attention_layers=dual_attention_layers,
    )


def tiny_zimage_transformer(seed: int = 0):
    """A two-layer ``ZImageTransformer2DModel`` with one noise and one context refiner; latents up to 64x64."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return ZImageTransformer2DModel(
        dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=QWEN_DIM,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )


def tiny_flow_vae(scaling: tuple[float, float], seed: int = 1):
    """A two-block ``AutoencoderKL`` with 16 latent channels (latents at half the image size)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=scaling[0], shift_factor=scaling[1], sample_size=32,
    )


def tiny_t5(seed: int = 4, width: int = T5_DIM):
    """A one-layer ``T5EncoderModel`` of ``width`` (64 unless given) and its tokenizer (letters, space, three specials)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(pieces), d_model=width, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config).eval(), tokenizer


def tiny_qwen3(seed: int = 5):
    """A two-layer ``Qwen3Model`` of width 16 and a byte-level tokenizer with a chat template."""
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

    vocab = {c: i for i, c in enumerate(byte_unicode_chars())}
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.chat_template = _CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(vocab), hidden_size=QWEN_DIM, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024)
    return Qwen3Model(config).eval(), tokenizer


def flow_scheduler(shift: float = 3.0, dynamic: bool = False):
    """The rectified-flow Euler scheduler both pipelines sample with (shift 3.0 as the published models)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=dynamic)


def build_tiny_sd3(tokenizer_dir: str | Path):
    """A tiny ``StableDiffusion3Pipeline``: two CLIP encoders with projection, T5, VAE, transformer."""
    from diffusers import StableDiffusion3Pipeline

    t5, t5_tokenizer = tiny_t5()
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(), scheduler=flow_scheduler(), vae=tiny_flow_vae(SD3_VAE_SCALING),
        text_encoder=tiny_text_encoder(with_projection=True, seed=2),
        tokenizer=tiny_tokenizer(tokenizer_dir),
        text_encoder_2=tiny_text_encoder(with_projection=True, seed=3, hidden=TEXT_DIM_2),
        tokenizer_2=tiny_tokenizer(tokenizer_dir, pad_token="!"),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )


def build_tiny_zimage():
    """A tiny ``ZImagePipeline``: Qwen3 text model, VAE, transformer."""
    from diffusers import ZImagePipeline

    qwen, tokenizer = tiny_qwen3()
    return ZImagePipeline(transformer=tiny_zimage_transformer(), scheduler=flow_scheduler(dynamic=False),
                          vae=tiny_flow_vae(FLUX_VAE_SCALING), text_encoder=qwen, tokenizer=tokenizer)


def save_tiny_sd3(path: str | Path) -> Path:
    """Save a tiny SD3 pipeline as a diffusers folder at ``path`` and return it."""
    path = Path(path)
    build_tiny_sd3(path.parent / f".{path.name}_tokenizer").save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_zimage(path: str | Path) -> Path:
    """Save a tiny Z-Image pipeline as a diffusers folder at ``path`` and return it."""
    path = Path(path)
    build_tiny_zimage().save_pretrained(path, safe_serialization=True)
    return path
