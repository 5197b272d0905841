"""Peak GPU memory of a LoRA training config, estimated before anything is loaded.

The estimate is a sum of parts a user can act on:

- ``unet``: the frozen UNet's weights in the compute dtype (bf16/fp16 = 2 bytes, ``no`` = 4).
- ``text_encoders``: their weights, only when they are trained (otherwise their outputs are cached).
- ``vae``: its weights, only when latents are not cached (kohya moves it off the GPU after caching).
- ``lora``: LoRA parameters + gradients (4 bytes each, 2 with ``full_bf16``/``full_fp16``) + optimizer
  state (see :data:`OPTIMIZER_STATES`: AdamW keeps 2 states of 4 bytes, AdamW8bit 2 of 1 byte).
- ``activations``: what autograd keeps for the backward pass, ``batch x megapixels x coefficient``; the
  coefficient is per architecture and per gradient checkpointing, fitted to :data:`CALIBRATION`. For the
  DiTs (``sd3`` = SD3.5 Large, ``zimage``) nothing is measured yet: their activations are counted from
  the block's operations (:data:`DIT_VALUES_PER_TOKEN`), tokens x width x blocks.
- ``text_encoder_activations``: the same for trained text encoders (77-token sequences; small).

Parameter counts are those of the published SD 1.5 / SDXL base models and kohya's LoRA targets
(every Linear and 1x1 Conv inside ``Transformer2DModel``; ``CLIPAttention``/``CLIPMLP`` in the text
encoders); ``tests/test_vram.py`` recounts them from the real module shapes. The estimate is the peak
of allocated tensors, which is what the calibration points measure; the CUDA context and allocator
fragmentation (together about 0.5-1 GiB) come on top, so leave that much headroom on the card.

``fp8_base``/``fp8_base_unet`` store the UNet/transformer weights in one byte. Frozen text encoders are
assumed to be cached (the built-in trainer always caches them; with sd-scripts set
``cache_text_encoder_outputs``), so T5-XXL and Qwen3 never count.

Nothing here imports torch: ``check`` and ``status`` show the estimate and must stay fast.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from training.config import TrainingConfig, parse_resolution
from training.errors import ConfigError
from training.families import DIT_SIZES, FAMILIES, VRAM_ARCH, FamilySizes

GIB = 1024 ** 3
ARCHS = ("sd15", "sdxl", "sd3", "zimage")


@dataclass(frozen=True)
class ArchSpec:
    """Parameter counts of one architecture (base models, and LoRA parameters per unit of rank)."""

    unet_params: int
    vae_params: int
    # one entry per text encoder: (parameters, LoRA parameters per rank, layers, width)
    text_encoders: tuple[tuple[int, int, int, int], ...]
    unet_lora_per_rank: int
    default_resolution: int
    dit: Optional[FamilySizes] = None  # the DiTs' shapes, for their activations


# CLIP ViT-L/14 text model: 12 layers of width 768; per layer the LoRA targets q, k, v, out (768 -> 768)
# and fc1/fc2 (768 <-> 3072): 4 * (768 + 768) + 2 * (768 + 3072) = 13,824 per rank.
_CLIP_L = (123_060_480, 12 * 13_824, 12, 768)
# OpenCLIP ViT-bigG/14 text model (SDXL's second encoder, with projection): 32 layers of width 1280.
_CLIP_BIG_G = (694_659_840, 32 * (4 * 2 * 1280 + 2 * (1280 + 5120)), 32, 1280)
_CLIP_L_PROJ = (123_650_304, 12 * 13_824, 12, 768)  # SD3's CLIP-L keeps its text projection


def _dit_spec(family: str, text_encoders: tuple) -> ArchSpec:
    sizes = DIT_SIZES[family]
    return ArchSpec(unet_params=sizes.transformer_params, vae_params=sizes.vae_params, text_encoders=text_encoders,
                    unet_lora_per_rank=sizes.lora_params_per_rank, default_resolution=1024, dit=sizes)


SPECS = {
    # UNet LoRA per rank: 16 transformer blocks, sum over blocks of 28*C + 2*768 plus the 1x1 proj_in/out.
    "sd15": ArchSpec(unet_params=859_520_964, vae_params=83_653_863, text_encoders=(_CLIP_L,),
                     unet_lora_per_rank=423_936, default_resolution=512),
    # 70 transformer blocks (1280-channel stacks of 10) with cross-attention width 2048, linear proj.
    "sdxl": ArchSpec(unet_params=2_567_463_684, vae_params=83_653_863, text_encoders=(_CLIP_L, _CLIP_BIG_G),
                     unet_lora_per_rank=2_659_840, default_resolution=1024),
    # SD3.5 Large; sd-scripts trains CLIP-L/G LoRA unless network_train_unet_only (T5 never here).
    "sd3": _dit_spec("sd3", (_CLIP_L_PROJ, _CLIP_BIG_G)),
    # Z-Image (Turbo, De-Turbo, base: one architecture); the Qwen3 text encoder is not trained.
    "zimage": _dit_spec("zimage", ()),
}

# Activation values autograd keeps per token and block, in units of the hidden size (bf16: 2 bytes each),
# with LoRA on every block Linear and SDPA (which keeps q, k, v, its output and a per-row statistic).
# SD3 joint block, per stream: LayerNorm input and output (2), modulated input (1, shared by q/k/v),
# RMS-norm inputs and outputs of q/k (4), v (1), attention output (1), gated output (1), second LayerNorm
# and modulation (2), 4x GELU MLP input, pre- and post-activation (1 + 4 + 4), its gate (1), adaLN (1): 23.
# Z-Image block: RMS norms around attention and MLP (4), modulation (2), q/k norms and rotary outputs
# (6), v and attention output (2), gates (2), SwiGLU of width 8/3: input, w1, w3, silu(w1), product
# (1 + 4 * 8/3): about 30. With gradient checkpointing each block keeps its input (1) and one block at a
# time is recomputed in full.
DIT_VALUES_PER_TOKEN = {"sd3": 23, "zimage": 30}

# Optimizer state per trainable parameter: (number of states, bytes per state). 8-bit optimizers keep
# their states in one byte (the block-wise scales are under 1% more). AdaFactor factors its second
# moment into row and column vectors: close to no state for LoRA's thin matrices; 0.5 is an upper bound.
OPTIMIZER_STATES = {
    "AdamW": (2, 4), "AdamW8bit": (2, 1), "Lion": (1, 4), "Lion8bit": (1, 1), "SGDNesterov": (1, 4),
    "SGDNesterov8bit": (1, 1), "Prodigy": (4, 4), "AdaFactor": (0.5, 4),
}


@dataclass(frozen=True)
class CalibrationPoint:
    """One measured peak: UNet-only LoRA training with cached latents and text embeddings, bf16."""

    arch: str
    resolution: int
    batch: int
    dim: int
    optimizer: str
    gradient_checkpointing: bool
    measured_gib: float
    where: str


# Real measurements (peak allocated memory over training steps). Add a point here when you measure one;
# the activation coefficients below are refitted from this table at import.
CALIBRATION = (
    CalibrationPoint("sdxl", 1024, 1, 128, "AdamW8bit", False, 16.0,
                     "H100, random-weight SDXL UNet, bf16, latents and text embeddings cached"),
    CalibrationPoint("sdxl", 1024, 1, 128, "AdamW8bit", True, 8.5,
                     "H100, random-weight SDXL UNet, bf16, latents and text embeddings cached"),
    CalibrationPoint("sd15", 512, 4, 64, "AdamW8bit", False, 7.1,
                     "H100, random-weight SD1.5 UNet, bf16, latents and text embeddings cached"),
    CalibrationPoint("sd15", 512, 4, 64, "AdamW8bit", True, 3.2,
                     "H100, random-weight SD1.5 UNet, bf16, latents and text embeddings cached"),
)


@dataclass(frozen=True)
class VramEstimate:
    """Estimated peak GPU memory in GiB, with the parts it is made of (GiB each)."""

    total_gib: float
    parts: dict[str, float] = field(default_factory=dict)
    arch: str = "sd15"
    arch_inferred: bool = False


def _lora_state_bytes(params: float, optimizer: str, half_weights: bool) -> float:
    states, state_bytes = OPTIMIZER_STATES.get(optimizer, OPTIMIZER_STATES["AdamW"])
    weight_bytes = 2 if half_weights else 4
    return params * (2 * weight_bytes + states * state_bytes)  # weights + gradients + states


def _static_parts(arch: str, dim: int, optimizer: str, *, mixed_precision: str = "bf16",
                  half_weights: bool = False, train_text_encoder: bool = False,
                  cache_latents: bool = True, fp8_base: bool = False) -> dict[str, float]:
    """Everything but activations, in bytes."""
    spec = SPECS[arch]
    weight_bytes = 4 if mixed_precision == "no" else 2
    lora_params = spec.unet_lora_per_rank * dim
    denoiser = "transformer" if arch in DIT_SIZES else "unet"
    parts = {denoiser: spec.unet_params * (1 if fp8_base else weight_bytes), "text_encoders": 0.0, "vae": 0.0}
    if train_text_encoder:
        parts["text_encoders"] = sum(te[0] for te in spec.text_encoders) * weight_bytes
        lora_params += sum(te[1] for te in spec.text_encoders) * dim
    if not cache_latents:
        parts["vae"] = spec.vae_params * weight_bytes
    parts["lora"] = _lora_state_bytes(lora_params, optimizer, half_weights)
    return parts


def _fit_activation_coefficients() -> dict[tuple[str, bool], float]:
    """Bytes of activations per sample per megapixel (bf16) for each (arch, checkpointing), from CALIBRATION.

    Each coefficient is the measured peak minus the computed static parts, divided by batch x megapixels;
    with several points for one key the mean is used.
    """
    sums: dict[tuple[str, bool], list[float]] = {}
    for p in CALIBRATION:
        static = sum(_static_parts(p.arch, p.dim, p.optimizer).values())
        per_unit = (p.measured_gib * GIB - static) / (p.batch * p.resolution ** 2 / 1e6)
        sums.setdefault((p.arch, p.gradient_checkpointing), []).append(per_unit)
    return {key: sum(values) / len(values) for key, values in sums.items()}


ACTIVATION_BYTES_PER_MEGAPIXEL = _fit_activation_coefficients()


def _text_encoder_activation_bytes(arch: str, batch: int, tokens: int, act_bytes: int, checkpointing: bool) -> float:
    # about 16 saved values per token and layer (q, k, v, attention output, 4x-wide MLP input and output,
    # layer norms); with checkpointing only each layer's input stays
    per_layer = 1 if checkpointing else 16
    return sum(layers * tokens * width * per_layer * act_bytes * batch
               for _, _, layers, width in SPECS[arch].text_encoders)


def _activation_bytes(arch: str, cfg: TrainingConfig, width: int, height: int, act_bytes: int) -> float:
    spec = SPECS[arch]
    if spec.dit is None:
        coefficient = ACTIVATION_BYTES_PER_MEGAPIXEL[(arch, cfg.gradient_checkpointing)]
        return coefficient * cfg.train_batch_size * width * height / 1e6 * act_bytes / 2
    # 8x smaller latents in 2x2 patches: one image token per 16x16 pixels
    tokens = width * height / 256 + spec.dit.caption_tokens
    per_block = DIT_VALUES_PER_TOKEN[arch]
    kept = spec.dit.layers + per_block if cfg.gradient_checkpointing else spec.dit.layers * per_block
    return cfg.train_batch_size * tokens * spec.dit.width * kept * act_bytes


def estimate_vram(cfg: TrainingConfig, arch: Optional[str] = None) -> VramEstimate:
    """Estimated peak GPU memory of training ``cfg``; ``arch`` (one of :data:`ARCHS`) is inferred when omitted.

    Inference reads the model file's tensor names without loading weights (see :func:`infer_arch`);
    a file that cannot be read that way is assumed to be SD 1.5.
    """
    from_file = file_arch(cfg.pretrained_model_name_or_path) if arch is None else None
    arch = arch or from_file or "sd15"
    if arch not in ARCHS:
        raise ConfigError(f"architecture {arch!r} is not known; use one of {', '.join(ARCHS)}")
    width, height = _resolution(cfg, arch)
    train_te = not cfg.network_train_unet_only
    parts = _static_parts(arch, cfg.network_dim, cfg.optimizer_type, mixed_precision=cfg.mixed_precision,
                          half_weights=cfg.full_bf16 or cfg.full_fp16, train_text_encoder=train_te,
                          cache_latents=cfg.cache_latents, fp8_base=cfg.fp8_base or cfg.fp8_base_unet)
    act_bytes = 4 if cfg.mixed_precision == "no" else 2
    parts["activations"] = _activation_bytes(arch, cfg, width, height, act_bytes)
    tokens = cfg.max_token_length + 2 if cfg.max_token_length else 77
    parts["text_encoder_activations"] = (_text_encoder_activation_bytes(
        arch, cfg.train_batch_size, tokens, act_bytes, cfg.gradient_checkpointing) if train_te else 0.0)
    gib = {name: value / GIB for name, value in parts.items()}
    return VramEstimate(total_gib=sum(gib.values()), parts=gib, arch=arch, arch_inferred=from_file is not None)


def _resolution(cfg: TrainingConfig, arch: str) -> tuple[int, int]:
    if cfg.resolution is None:
        side = SPECS[arch].default_resolution
        return side, side
    return parse_resolution(cfg.resolution)


def vram_line(cfg: TrainingConfig, arch: Optional[str] = None) -> str:
    """One line for ``plan``/``check``/``status``: the estimate and the settings that drive it."""
    est = estimate_vram(cfg, arch)
    width, height = _resolution(cfg, est.arch)
    arch_note = est.arch if est.arch_inferred or arch is not None else f"{est.arch} assumed"
    checkpointing = "gradient checkpointing" if cfg.gradient_checkpointing else "no gradient checkpointing"
    details = [arch_note, f"{width}x{height}", f"batch {cfg.train_batch_size}", f"dim {cfg.network_dim}",
               cfg.optimizer_type, checkpointing]
    if not cfg.network_train_unet_only and SPECS[est.arch].text_encoders:
        details.append("text encoder trained")
    if cfg.fp8_base or cfg.fp8_base_unet:
        details.append("fp8 base")
    if SPECS[est.arch].dit is not None:
        details.append("activations counted, not measured")
    return f"VRAM estimate: {est.total_gib:.1f} GiB ({', '.join(details)})"


# --------------------------------------------------------------------------- architecture from the file

# Tensor names only SDXL has: the second text encoder of a single-file checkpoint, or the UNet's
# added time/text embedding (single-file "label_emb", diffusers "add_embedding").
_SDXL_MARKERS = ("conditioner.embedders.1.", "model.diffusion_model.label_emb.", "add_embedding.")
_SD_MARKERS = ("model.diffusion_model.", "cond_stage_model.", "down_blocks.", "text_model.")
# SD3's MMDiT (original and diffusers names) and Z-Image's refiners, checked before the SD markers.
DIT_MARKERS = {
    "sd3": ("model.diffusion_model.joint_blocks.", "joint_blocks.", "transformer_blocks.0.attn.add_q_proj."),
    "zimage": ("model.diffusion_model.noise_refiner.", "noise_refiner.", "diffusion_model.noise_refiner."),
}


def _safetensors_keys(path: Path) -> Optional[list[str]]:
    """Tensor names from a safetensors header (8-byte length + JSON), without reading any tensor."""
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 * 1024 ** 2:
                return None
            header = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError):
        return None
    return [key for key in header if key != "__metadata__"] if isinstance(header, dict) else None


def _folder_arch(folder: Path) -> Optional[str]:
    for name in ("model_index.json", "unet/config.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("_class_name") in FAMILIES:
            return VRAM_ARCH[FAMILIES[data["_class_name"]]]
        if "XL" in str(data.get("_class_name", "")) or data.get("addition_embed_type") == "text_time":
            return "sdxl"
        if "_class_name" in data:
            return "sd15"
    return None


def file_arch(model: str) -> Optional[str]:
    """The architecture of a model file (from its tensor names) or diffusers folder; None when unknown."""
    if not model:
        return None
    path = Path(model)
    if path.is_dir():
        return _folder_arch(path)
    if path.suffix != ".safetensors":
        return None  # a pickled .ckpt cannot be read without loading it
    keys = _safetensors_keys(path)
    if not keys:
        return None
    for arch, markers in DIT_MARKERS.items():
        if any(key.startswith(markers) for key in keys):
            return arch
    if any(key.startswith(_SDXL_MARKERS) for key in keys):
        return "sdxl"
    return "sd15" if any(key.startswith(_SD_MARKERS) for key in keys) else None


def infer_arch(model: str) -> str:
    """One of :data:`ARCHS` from a model file's tensor names or a diffusers folder's config; "sd15" when unknown."""
    return file_arch(model) or "sd15"
