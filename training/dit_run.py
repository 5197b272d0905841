"""The SD3/Z-Image side of a training run: what ``training/trainer.py`` asks of a DiT model.

The trainer's loop (epochs, batches, gradient accumulation, optimizer, checkpoints, states, resume,
logging) is the same for every family. For a diffusers folder of a DiT family it holds a
:class:`DitModels` instead of ``training.models.SDModels`` and a :class:`DitNetwork` instead of
``training.network.LoraNetwork``, and calls here for what differs:

- loading (:func:`load_dit_models`): the pipeline offline, the Z-Image Turbo training adapter merged at
  +1 (``training_adapter``), the frozen transformer stored in fp8 (``fp8_base``);
- the LoRA (:class:`DitNetwork`): on the block Linears, or their attention only
  (``network_attention_only``); files in the family's format, exact weights in the training state;
- captions (:class:`DitCaptionCache`): every caption encoded once with the text encoders on the device
  only meanwhile (T5-XXL and Qwen3 are large), then kept on the CPU; the text encoders are never trained;
- the loss (:func:`dit_loss`): the family's flow-matching loss, weighted per sample as the UNet's is;
- samples: :func:`training.sampling.sample_dit_images`, through the family's pipeline with the training
  adapter removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from training.config import TrainingConfig
from training.devices import autocast
from training.dit import DitConditioning, DitFamily, family, store_base_in_fp8
from training.dit_lora import DitLora
from training.network import LoraPart

log = logging.getLogger(__name__)


@dataclass
class DitModels:
    """A loaded SD3/Z-Image pipeline, its family (set up from the config) and its training adapter."""

    family: DitFamily
    pipe: Any
    adapter: Any = None  # training.adapter.TrainingAdapter, merged into the transformer

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def text_encoders(self) -> list:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None]

    @property
    def base_model_version(self) -> str:
        return self.family.base_model_version(self.transformer)


def load_dit_models(cfg: TrainingConfig, name: str, compute_dtype: Optional[torch.dtype]) -> DitModels:
    """The pipeline of ``cfg.pretrained_model_name_or_path`` (a ``name`` family folder), ready for LoRA.

    Weights are read in ``compute_dtype`` (the mixed-precision dtype; float32 without one), so a bf16 run
    of SD3.5 Large never holds a float32 copy of its 8B transformer and T5-XXL in host memory. The
    training adapter is merged (its update computed in float32) before the transformer is stored in fp8
    (``fp8_base``, computing in ``compute_dtype``), and both before the LoRA is added.
    """
    fam = family(name).for_config(cfg)
    pipe = fam.load(cfg.pretrained_model_name_or_path, compute_dtype or torch.float32)
    models = DitModels(family=fam, pipe=pipe)
    if cfg.training_adapter:
        from training.adapter import TrainingAdapter

        models.adapter = TrainingAdapter(pipe.transformer, fam, cfg.training_adapter)
        models.adapter.merge()
        log.info("training adapter %s merged into the transformer (%d modules); removed while sampling",
                 cfg.training_adapter, len(models.adapter.entries))
    for module in [pipe.transformer, pipe.vae, *models.text_encoders]:
        module.requires_grad_(False)
    if cfg.fp8_base or cfg.fp8_base_unet:
        store_base_in_fp8(pipe.transformer, compute_dtype or torch.bfloat16)
        log.info("the transformer's frozen weights are stored in float8 (e4m3), computed in %s",
                 str(compute_dtype or torch.bfloat16).removeprefix("torch."))
    return models


class DitNetwork(DitLora):
    """:class:`training.dit_lora.DitLora` with the interface the trainer uses for a UNet's LoRA network."""

    @property
    def parts(self) -> list[LoraPart]:
        return [LoraPart("lora_unet", self.transformer)]  # the denoiser, under the UNet's name in logs

    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict]:
        return [{"params": self.parameters(), "lr": unet_lr}]

    def module_counts(self) -> dict[str, int]:
        return {"transformer": len(self.targets)}

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor], source: str = "training state") -> None:
        self.load_state_dict(state, source)


def build_dit_network(cfg: TrainingConfig, models: DitModels) -> DitNetwork:
    network = DitNetwork(models.transformer, models.family, dim=cfg.network_dim, alpha=cfg.network_alpha,
                         dropout=cfg.network_dropout, attention_only=cfg.network_attention_only)
    if cfg.network_weights:
        network.load(cfg.network_weights)
    return network


def place_dit_models(models: DitModels, device: torch.device, weight_dtype: torch.dtype, vae_dtype: torch.dtype,
                     gradient_checkpointing: bool) -> list:
    """Transformer and VAE onto ``device`` (frozen weights in ``weight_dtype`` unless stored in fp8, LoRA
    weights float32); text encoders in ``weight_dtype`` on the CPU. Returns the modules to bring to the
    device only while sampling (the text encoders)."""
    transformer = models.transformer
    transformer.to(device)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
        elif param.dtype != torch.float8_e4m3fn:
            param.data = param.data.to(weight_dtype)
    transformer.train()
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    placements = [(models.vae, device, vae_dtype)] + [(e, "cpu", weight_dtype) for e in models.text_encoders]
    for module, where, dtype in placements:
        if next(module.parameters()).dtype != dtype:
            module.to(dtype=dtype)
        module.to(where).eval()
    return list(models.text_encoders)


class DitCaptionCache:
    """Every caption's conditioning, encoded once (text encoders on the device only meanwhile) and kept in
    CPU memory: SD3's 333 tokens x 4096 are 2.7 MB a caption in bf16, too much to hold a large dataset's on a
    16 GB GPU. :meth:`lookup` gives a batch's :class:`training.dit.DitConditioning` on the device."""

    def __init__(self, models: DitModels, captions: Iterable[str], device: torch.device,
                 autocast_dtype: Optional[torch.dtype], chunk: int = 16) -> None:
        from training.fast import models_on

        self.models, self.device, self.autocast_dtype = models, device, autocast_dtype
        texts = sorted(set(captions))
        self.items: dict[str, DitConditioning] = {}
        with models_on(models.text_encoders, device):
            for start in range(0, len(texts), chunk):
                part = texts[start:start + chunk]
                self.items.update(zip(part, self._encode(part).split()))

    def _encode(self, captions: list[str]) -> DitConditioning:
        with torch.no_grad(), autocast(self.device, self.autocast_dtype):
            encoded = self.models.family.encode_captions(self.models.pipe, captions, self.device)
        return encoded.to("cpu") if self.device.type != "cpu" else encoded

    def __len__(self) -> int:
        return len(self.items)

    def lookup(self, captions: list[str], batch: Any = None) -> DitConditioning:
        missing = sorted({c for c in captions if c not in self.items})
        if missing:  # every caption is cached up front; this only guards against a caption rule changing
            log.warning("%d caption(s) outside the text-embedding cache; encoding them now", len(missing))
            from training.fast import models_on

            with models_on(self.models.text_encoders, self.device):
                self.items.update(zip(missing, self._encode(missing).split()))
        joined = DitConditioning.join([self.items[c] for c in captions])
        return joined.to(self.device) if self.device.type != "cpu" else joined


def dit_loss(models: DitModels, latents: torch.Tensor, conditioning: DitConditioning, weights: torch.Tensor,
             device: torch.device, autocast_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The batch's flow-matching loss: the family's per-sample loss times ``weights`` (0 for a padded batch's
    filler rows), averaged over the batch as the UNet's loss is. Noise, then sigma, are drawn here."""
    with autocast(device, autocast_dtype):
        per_sample = models.family.training_loss(models.transformer, latents, conditioning)
    return (per_sample.float() * weights).mean()
