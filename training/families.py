"""Model families: what differs between SD 1.x/SDXL (UNets, DDPM) and SD3/Z-Image (DiTs, rectified flow).

A diffusers folder names its pipeline class in ``model_index.json``; :func:`detect_family` turns that into
one of :data:`FAMILIES`. Everything the training step needs to know about a family sits behind
:class:`ModelFamily`: how to load it, encode captions, make the noisy input and read the prediction, which
modules carry LoRA and under which file keys, how to sample, and what it weighs for the VRAM estimate.
The DiT families are implemented in :mod:`training.dit`, and :mod:`training.dit_run` is what the
trainer's loop (``training/trainer.py``, shared by all four) calls for them; SD 1.x/SDXL code is in the
trainer itself.

Nothing here imports torch, so ``check`` and ``plan`` can detect a family cheaply.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.errors import ConfigError, LoraSearchError

if TYPE_CHECKING:
    import torch

# diffusers pipeline class -> family name
FAMILIES = {
    "StableDiffusionPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "ZImagePipeline": "zimage",
}
DIT_FAMILIES = ("sd3", "zimage")
# family -> how messages name it
LABELS = {"sd1": "SD 1.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5", "zimage": "Z-Image"}
# family -> the architecture key of the VRAM estimate (training/vram.py SPECS)
VRAM_ARCH = {"sd1": "sd15", "sdxl": "sdxl", "sd3": "sd3", "zimage": "zimage"}

# Config keys that only mean something for the flow-matching DiTs.
FLOW_KEYS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "training_shift")
# Keys of sd-scripts' sd3_train_network.py that only SD3 has. The built-in trainer takes the model from
# the diffusers folder and reads only BUILTIN_SD3_KEYS of them.
SD3_KEYS = ("clip_l", "clip_g", "t5xxl", "t5xxl_max_token_length", "apply_lg_attn_mask", "apply_t5_attn_mask",
            "clip_l_dropout_rate", "clip_g_dropout_rate", "t5_dropout_rate", "pos_emb_random_crop_rate",
            "enable_scaled_pos_embed", "blocks_to_swap", "disable_mmap_load_safetensors")
BUILTIN_SD3_KEYS = ("t5xxl_max_token_length",)
# lora-search's own keys for the DiT families (built-in trainer only; not sd-scripts names).
BUILTIN_DIT_KEYS = ("training_adapter", "turbo", "network_attention_only")
# UNet-only options the flow-matching loss has no use for: refused on a DiT rather than ignored.
UNET_ONLY_KEYS = ("v2", "v_parameterization", "clip_skip", "max_token_length", "min_snr_gamma", "noise_offset")


class UnsupportedModelError(LoraSearchError):
    """A model folder whose family lora-search cannot train."""


def pipeline_class(folder: str | Path) -> str:
    """The ``_class_name`` in a diffusers folder's ``model_index.json``."""
    index = Path(folder) / "model_index.json"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnsupportedModelError(f"{folder} has no model_index.json; give a diffusers model folder") from None
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{index} is not readable JSON ({exc}); check the model folder") from None
    name = data.get("_class_name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise UnsupportedModelError(f"{index} names no pipeline (_class_name); check the model folder")
    return name


def detect_family(folder: str | Path) -> str:
    """``"sd1"``, ``"sdxl"``, ``"sd3"`` or ``"zimage"`` for a diffusers folder; any other pipeline is refused."""
    name = pipeline_class(folder)
    if name not in FAMILIES:
        known = ", ".join(f"{cls} ({family})" for cls, family in FAMILIES.items())
        raise UnsupportedModelError(f"{folder} is a {name}, which lora-search cannot train; supported: {known}")
    return FAMILIES[name]


def dit_family_of(model: str | Path | None) -> str | None:
    """``"sd3"`` or ``"zimage"`` when ``model`` is a diffusers folder of a DiT family; None for an SD 1.x/SDXL
    folder or checkpoint file (and for a path that is not there: loading it says so). An unknown pipeline
    class is refused."""
    if not model or not (Path(model).expanduser() / "model_index.json").is_file():
        return None
    name = detect_family(Path(model).expanduser())
    return name if name in DIT_FAMILIES else None


@dataclass(frozen=True)
class SamplingDefaults:
    """How samples are made when the prompt line does not say (``--s`` steps, ``--l`` guidance)."""

    steps: int
    cfg_scale: float  # kohya's/ComfyUI's convention: uncond + cfg * (cond - uncond); 1 = no guidance
    pipeline: str  # the diffusers pipeline class that samples


@dataclass(frozen=True)
class FamilySizes:
    """Sizes of a published DiT for the VRAM estimate (see :mod:`training.vram`)."""

    transformer_params: int
    vae_params: int
    lora_params_per_rank: int  # default targets (every block Linear): sum of in + out features
    attention_lora_params_per_rank: int  # attention-only targets
    layers: int  # transformer blocks every token passes (Z-Image: 30 layers + 2 refiners)
    width: int  # hidden size
    caption_tokens: int  # text tokens per sample beside the image tokens


# Counted from the published configs on the meta device (diffusers 0.42.1; tests/test_dit_vram.py recounts).
DIT_SIZES = {
    "sd3": FamilySizes(8_056_627_520, 83_821_011, 4_581_888, 1_473_792, layers=38, width=2432,
                       caption_tokens=77 + 256),  # SD3.5 Large; CLIP-L/G 77 tokens + T5 256
    "zimage": FamilySizes(6_154_908_736, 83_821_011, 2_980_352, 1_044_480, layers=32, width=3840,
                          caption_tokens=256),  # Qwen3 chat-templated caption, padded to 32s; 512 at most
}


class ModelFamily(ABC):
    """What one model family contributes to a LoRA training step.

    The trainer's step reads the same for every family: draw noise and a noise level, build the noisy
    input, ask the family for the model's prediction, take the family's loss; LoRA modules and file keys,
    sampling and memory figures come from here too.
    """

    name: str  # one of FAMILIES' values
    pipeline_class: str  # the diffusers pipeline that loads and samples it

    @property
    def vram_arch(self) -> str:
        """Its architecture in the VRAM estimate (:data:`VRAM_ARCH`, ``training.vram.SPECS``)."""
        return VRAM_ARCH[self.name]

    @abstractmethod
    def load(self, folder: str | Path, dtype: "torch.dtype") -> Any:
        """The pipeline from a diffusers folder, offline (no hub access)."""

    @abstractmethod
    def encode_captions(self, models: Any, captions: list[str], device: "torch.device") -> Any:
        """Text conditioning for a batch of captions, in the form :meth:`predict` takes."""

    @abstractmethod
    def sample_noise_levels(self, batch_size: int, device: Any = "cpu", generator: Any = None) -> "torch.Tensor":
        """One noise level per sample (``sigma`` for the flow families)."""

    @abstractmethod
    def noisy_input_and_target(self, latents: "torch.Tensor", noise: "torch.Tensor",
                               levels: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """The model's input at ``levels`` and what :meth:`predict`'s output is compared with."""

    @abstractmethod
    def predict(self, model: Any, noisy: "torch.Tensor", levels: "torch.Tensor", conditioning: Any) -> "torch.Tensor":
        """The model's prediction for ``noisy``, in the form of the target."""

    @abstractmethod
    def loss(self, prediction: "torch.Tensor", target: "torch.Tensor", levels: "torch.Tensor") -> "torch.Tensor":
        """Per-sample loss, shape ``(B,)``."""

    @abstractmethod
    def lora_targets(self, model: Any, attention_only: bool = False) -> list[str]:
        """Module paths in ``model`` that carry LoRA by default (or only its attention projections)."""

    @abstractmethod
    def file_state_dict(self, lora: dict[str, Any], alpha: float, rank: int) -> dict[str, Any]:
        """LoRA tensors (module path -> ``(down, up)``) under the keys and strength convention of this
        family's file, the one diffusers' ``load_lora_weights`` and ComfyUI both load completely."""

    @abstractmethod
    def base_model_version(self, model: Any) -> str:
        """kohya's ``ss_base_model_version`` for this model."""

    @abstractmethod
    def sampling_defaults(self, turbo: bool = False) -> SamplingDefaults:
        """Steps and guidance for samples of the base model (``turbo``: its step-distilled variant)."""


def check_family_config(cfg: Any, family_name: str, builtin: bool = True) -> None:
    """Refuse config keys that the model family (and the trainer: built-in or sd-scripts) would not use."""
    given = set(cfg.to_dict(include_defaults=False))
    label = LABELS.get(family_name, family_name)
    if family_name not in DIT_FAMILIES:
        _check_unet(cfg, label, given, builtin)
    elif builtin:
        _check_builtin_dit(cfg, family_name, label, given)
    else:
        _check_kohya_dit(cfg, family_name, given)


def _check_unet(cfg: Any, label: str, given: set[str], builtin: bool) -> None:
    stray = [key for key in FLOW_KEYS + SD3_KEYS + BUILTIN_DIT_KEYS if key in given]
    if stray:
        raise ConfigError(f"{stray[0]} applies to SD3/Z-Image models only; remove it for this {label} model")
    if cfg.network_module != "networks.lora":
        raise ConfigError(f"network_module = {cfg.network_module!r} is for SD3 models; use \"networks.lora\"")
    if builtin and (cfg.fp8_base or cfg.fp8_base_unet):
        raise ConfigError(f"fp8_base: the built-in trainer keeps {label} weights in the mixed_precision "
                          "dtype; remove it (it applies to SD3/Z-Image) or use the kohya backend")


def _check_builtin_dit(cfg: Any, family_name: str, label: str, given: set[str]) -> None:
    _check_dit_common(cfg, label, given)
    if cfg.training_adapter and family_name != "zimage":
        raise ConfigError(f"training_adapter is for Z-Image Turbo; remove it for this {label} model")
    if family_name == "zimage":
        stray = [key for key in SD3_KEYS if key in given]
        if stray or cfg.network_module != "networks.lora":
            what = stray[0] if stray else f"network_module = {cfg.network_module!r}"
            raise ConfigError(f"{what} applies to SD3 models only; remove it for this Z-Image model")
    stray = [key for key in SD3_KEYS if key in given and key not in BUILTIN_SD3_KEYS]
    if stray:
        raise ConfigError(f"{stray[0]} is read by sd-scripts' sd3_train_network.py only; the built-in trainer "
                          "takes the model from the diffusers folder: remove it or use the kohya backend")


def _check_dit_common(cfg: Any, label: str, given: set[str]) -> None:
    """Options of SD 1.x/SDXL training that a DiT run would silently ignore, and text-encoder training."""
    stray = [key for key in UNET_ONLY_KEYS if key in given and getattr(cfg, key)]
    if stray:
        raise ConfigError(f"{stray[0]} applies to SD 1.x/SDXL (UNet) models only; remove it for this "
                          f"{label} model")
    if cfg.network_train_text_encoder_only or cfg.text_encoder_lr:
        what = "network_train_text_encoder_only" if cfg.network_train_text_encoder_only else "text_encoder_lr"
        raise ConfigError(f"{what}: the built-in trainer does not train the {label} text encoders (their "
                          "outputs are cached); remove it")


def _check_kohya_dit(cfg: Any, family_name: str, given: set[str]) -> None:
    stray = [key for key in BUILTIN_DIT_KEYS if key in given]
    if stray:
        raise ConfigError(f"{stray[0]} is read by the built-in trainer only; remove it or use the built-in backend")
    if family_name == "zimage":
        raise ConfigError("Z-Image is not in sd-scripts (kohya's musubi-tuner trains it with its own dataset "
                          "config); use the built-in trainer")
    if cfg.network_module != "networks.lora_sd3":
        raise ConfigError(f"network_module = {cfg.network_module!r}: sd3_train_network.py needs "
                          "\"networks.lora_sd3\"")
