"""The rectified-flow DiT families: SD3/SD3.5 (``StableDiffusion3Pipeline``) and Z-Image (``ZImagePipeline``).

Both learn the velocity ``noise - x0`` along ``x_t = (1 - sigma) x0 + sigma noise`` (:mod:`training.flow`);
they differ in how the transformer is called and what its output means (diffusers 0.42.1, checked in
``tests/test_dit_family.py`` by running each pipeline's own denoising loop):

- SD3 takes ``timestep = 1000 * sigma`` and predicts the velocity. Its loss is preconditioned as in
  sd-scripts and diffusers: the clean latent the prediction implies, ``x_t - sigma * v``, against ``x0``.
- Z-Image takes per-sample lists (``(C, 1, H, W)`` latents, unpadded caption features) and
  ``t = 1 - sigma``, and predicts ``x0 - noise``: the negated velocity. Its loss is on the velocity.

LoRA files: SD3 keys are ``transformer.<diffusers path>.lora_A/lora_B.weight`` with ``alpha / rank``
folded into ``lora_B`` (diffusers ignores ``.alpha`` tensors for SD3 and ComfyUI ignores metadata, so
folding is the only way both load the right strength); Z-Image keys are
``diffusion_model.<diffusers path>.lora_A/lora_B.weight`` plus a ``.alpha`` tensor each, which both read.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from training.errors import LoraSearchError
from training.families import DIT_FAMILIES, ModelFamily, SamplingDefaults, UnsupportedModelError, detect_family
from training.flow import FlowSettings, noisy_latents, sample_sigmas, velocity_target, weighted_mse
from training.network import target_module_names


class DitLoadError(LoraSearchError):
    """A DiT model folder that cannot be loaded."""


@dataclass
class DitConditioning:
    """Text conditioning of a batch: SD3's padded ``(B, L, D)`` embeddings and pooled ``(B, P)`` vector, or
    Z-Image's list of unpadded ``(L_i, D)`` caption features (``pooled`` is ``None``)."""

    embeds: Any
    pooled: Optional[torch.Tensor] = None

    def split(self) -> list["DitConditioning"]:
        """One conditioning per caption (what a caption cache stores)."""
        pooled = [None] * len(self.embeds) if self.pooled is None else list(self.pooled)
        return [DitConditioning(embeds=e, pooled=p) for e, p in zip(self.embeds, pooled)]

    def to(self, device: torch.device | str) -> "DitConditioning":
        """The same conditioning on ``device``."""
        embeds = ([e.to(device, non_blocking=True) for e in self.embeds] if isinstance(self.embeds, list)
                  else self.embeds.to(device, non_blocking=True))
        pooled = None if self.pooled is None else self.pooled.to(device, non_blocking=True)
        return DitConditioning(embeds=embeds, pooled=pooled)

    @staticmethod
    def join(items: list["DitConditioning"]) -> "DitConditioning":
        """The batch conditioning of per-caption items from :meth:`split`."""
        if items[0].pooled is None:
            return DitConditioning(embeds=[i.embeds for i in items])
        return DitConditioning(embeds=torch.stack([i.embeds for i in items]),
                               pooled=torch.stack([i.pooled for i in items]))


@dataclass(frozen=True)
class LoraFileFormat:
    """How a family's LoRA file names its tensors."""

    prefix: str  # before the diffusers module path
    alpha_tensors: bool  # write ``<key>.alpha``; else alpha / rank is folded into lora_B


@dataclass
class DitFamily(ModelFamily):
    """Shared parts of the flow-matching DiT families; subclasses set the model-specific conventions."""

    flow: FlowSettings = field(default_factory=FlowSettings)

    block_classes: tuple[str, ...] = ()
    file_format: LoraFileFormat = LoraFileFormat("transformer.", False)
    precondition: bool = False

    def with_flow(self, flow: FlowSettings) -> "DitFamily":
        """The same family with other timestep-sampling settings."""
        return dataclasses.replace(self, flow=flow)

    def for_config(self, cfg: Any) -> "DitFamily":
        """The family as a training config sets it up (timestep sampling; SD3's T5 length)."""
        return self.with_flow(FlowSettings.from_config(cfg))

    def load(self, folder: str | Path, dtype: torch.dtype = torch.float32) -> Any:
        import diffusers

        found = detect_family(folder)
        if found != self.name:
            raise DitLoadError(f"{folder} is a {found} model, not {self.name}; check pretrained_model_name_or_path")
        cls = getattr(diffusers, self.pipeline_class)
        try:
            return cls.from_pretrained(folder, dtype=dtype, local_files_only=True, **_absent_components(folder))
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DitLoadError(f"{folder}: cannot load the {self.pipeline_class} ({first}); check the folder") from None

    def sample_noise_levels(self, batch_size: int, device: torch.device | str = "cpu",
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``sigma`` per sample, drawn with :attr:`flow`."""
        return sample_sigmas(self.flow, batch_size, device, generator)

    def noisy_input_and_target(self, latents: torch.Tensor, noise: torch.Tensor,
                               sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = noisy_latents(latents, noise, sigmas)
        return noisy, (latents if self.precondition else velocity_target(latents, noise))

    def predict(self, model: Any, noisy: torch.Tensor, sigmas: torch.Tensor,
                conditioning: DitConditioning) -> torch.Tensor:
        velocity = self.velocity(model, noisy, sigmas, conditioning)
        if not self.precondition:
            return velocity
        return noisy - sigmas.to(velocity.dtype).view(-1, 1, 1, 1) * velocity

    @abstractmethod
    def velocity(self, model: Any, noisy: torch.Tensor, sigmas: torch.Tensor,
                 conditioning: DitConditioning) -> torch.Tensor:
        """The transformer's velocity prediction ``noise - x0`` for ``noisy`` (B, C, H, W) at ``sigmas``."""

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """Per-sample loss, shape ``(B,)``, weighted by :attr:`flow`'s ``weighting_scheme``."""
        return weighted_mse(prediction, target, sigmas, self.flow)

    def training_loss(self, model: Any, latents: torch.Tensor, conditioning: DitConditioning,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One batch's per-sample loss: noise, then ``sigma``, drawn in that order (so a restored RNG state
        replays the same step), the noisy input, the prediction and its loss."""
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        sigmas = self.sample_noise_levels(latents.shape[0], latents.device, generator)
        noisy, target = self.noisy_input_and_target(latents, noise, sigmas)
        return self.loss(self.predict(model, noisy, sigmas, conditioning), target, sigmas)

    def lora_targets(self, model: Any, attention_only: bool = False) -> list[str]:
        blocks = target_module_names(model, self.block_classes)
        if not attention_only:
            return blocks
        inside_blocks = set(blocks)
        return [name for name in target_module_names(model, ("Attention",)) if name in inside_blocks]

    def file_state_dict(self, lora: dict[str, Any], alpha: float, rank: int) -> dict[str, torch.Tensor]:
        scale = alpha / rank
        out = {}
        for path, (down, up) in lora.items():
            key = self.file_format.prefix + path
            out[f"{key}.lora_A.weight"] = down
            if self.file_format.alpha_tensors:
                out[f"{key}.lora_B.weight"] = up
                out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=down.dtype)
            else:
                out[f"{key}.lora_B.weight"] = up * scale
        return out

    def read_file_state_dict(self, tensors: dict[str, torch.Tensor]
                             ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """``module path -> (down, up, scale)`` from a file in this family's format (scale 1 when no alpha)."""
        prefix, out = self.file_format.prefix, {}
        for key, down in tensors.items():
            if not (key.startswith(prefix) and key.endswith(".lora_A.weight")):
                continue
            stem = key[: -len(".lora_A.weight")]
            up = tensors.get(f"{stem}.lora_B.weight")
            if up is None:
                raise LoraSearchError(f"LoRA file: {stem}.lora_B.weight is missing (its lora_A is there); "
                                      "the file is incomplete")
            alpha = tensors.get(f"{stem}.alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            out[stem[len(prefix):]] = (down, up, scale)
        return out

    @staticmethod
    @abstractmethod
    def pipeline_guidance(cfg_scale: float) -> float:
        """The pipeline's ``guidance_scale`` for a CFG scale in the usual convention (kohya's ``--l``)."""

    def sample(self, pipe: Any, prompt: str, *, width: int, height: int, negative_prompt: str = "",
               steps: Optional[int] = None, cfg_scale: Optional[float] = None, seed: int = 0,
               turbo: bool = False) -> Any:
        """One sample image (PIL) through the family's pipeline; unset steps and CFG take the family's defaults."""
        defaults = self.sampling_defaults(turbo)
        guidance = self.pipeline_guidance(defaults.cfg_scale if cfg_scale is None else cfg_scale)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return pipe(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height,
                    num_inference_steps=steps or defaults.steps, guidance_scale=guidance,
                    generator=generator, **self.pipeline_caption_options()).images[0]

    def pipeline_caption_options(self) -> dict[str, Any]:
        """Keyword arguments that make the pipeline encode prompts as :meth:`encode_captions` does."""
        return {}

    def metadata(self, model: Any) -> dict[str, str]:
        """The family's kohya ``ss_*`` metadata: base model version and the timestep sampling."""
        flow = self.flow
        return {"ss_base_model_version": self.base_model_version(model), "ss_weighting_scheme": flow.weighting_scheme,
                "ss_logit_mean": str(flow.logit_mean), "ss_logit_std": str(flow.logit_std),
                "ss_mode_scale": str(flow.mode_scale), "ss_training_shift": str(flow.training_shift)}

    @staticmethod
    def normalize_latents(vae: Any, raw: torch.Tensor) -> torch.Tensor:
        """VAE latents as the transformer sees them: ``(z - shift_factor) * scaling_factor``."""
        return (raw - vae.config.shift_factor) * vae.config.scaling_factor


def _absent_components(folder: str | Path) -> dict[str, None]:
    """Components ``model_index.json`` lists as ``[null, null]`` (an SD3 folder saved without T5-XXL), to
    pass as None: diffusers' loader wants them named even when there is nothing to load."""
    import json

    index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    return {name: None for name, entry in index.items()
            if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and not any(entry)}


@dataclass
class SD3Family(DitFamily):
    """Stable Diffusion 3 / 3.5 (MMDiT, three text encoders: CLIP-L, CLIP-G, T5-XXL)."""

    name: str = "sd3"
    pipeline_class: str = "StableDiffusion3Pipeline"
    block_classes: tuple[str, ...] = ("JointTransformerBlock",)
    file_format: LoraFileFormat = LoraFileFormat("transformer.", alpha_tensors=False)
    precondition: bool = True
    t5_max_length: int = 256  # sd-scripts' t5xxl_max_token_length and the pipeline's default

    def for_config(self, cfg: Any) -> "SD3Family":
        return dataclasses.replace(super().for_config(cfg), t5_max_length=cfg.t5xxl_max_token_length)

    @staticmethod
    def model_timestep(sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas * 1000

    def encode_captions(self, models: Any, captions: list[str], device: torch.device | str = "cpu") -> DitConditioning:
        with torch.no_grad():
            embeds, _, pooled, _ = models.encode_prompt(
                prompt=list(captions), prompt_2=None, prompt_3=None, device=torch.device(device),
                do_classifier_free_guidance=False, max_sequence_length=self.t5_max_length)
        return DitConditioning(embeds=embeds, pooled=pooled)

    def pipeline_caption_options(self) -> dict[str, Any]:
        # samples see as many T5 tokens as training did (sd-scripts samples with t5xxl_max_token_length too)
        return {"max_sequence_length": self.t5_max_length}

    def velocity(self, model: Any, noisy: torch.Tensor, sigmas: torch.Tensor,
                 conditioning: DitConditioning) -> torch.Tensor:
        return model(hidden_states=noisy, encoder_hidden_states=conditioning.embeds,
                     pooled_projections=conditioning.pooled, timestep=self.model_timestep(sigmas),
                     return_dict=False)[0]

    def base_model_version(self, model: Any) -> str:
        # sd-scripts' names (library/sd3_utils.py): qk-norm marks 3.5, dual attention layers 3.5 Medium
        if model.config.qk_norm is None:
            return "medium"
        return "5-medium" if model.config.dual_attention_layers else "5-large"

    def sampling_defaults(self, turbo: bool = False) -> SamplingDefaults:
        # SD3.5 Large Turbo: 4 steps without CFG (Stability's demo); the pipeline's defaults otherwise.
        if turbo:
            return SamplingDefaults(steps=4, cfg_scale=1.0, pipeline=self.pipeline_class)
        return SamplingDefaults(steps=28, cfg_scale=7.0, pipeline=self.pipeline_class)

    @staticmethod
    def pipeline_guidance(cfg_scale: float) -> float:
        return cfg_scale  # StableDiffusion3Pipeline guides in the usual convention (off at <= 1)



@dataclass
class ZImageFamily(DitFamily):
    """Z-Image (single-stream DiT with noise and context refiners, Qwen3 text encoder)."""

    name: str = "zimage"
    pipeline_class: str = "ZImagePipeline"
    block_classes: tuple[str, ...] = ("ZImageTransformerBlock",)
    file_format: LoraFileFormat = LoraFileFormat("diffusion_model.", alpha_tensors=True)
    precondition: bool = False
    max_caption_tokens: int = 512  # the pipeline's max_sequence_length

    @staticmethod
    def model_timestep(sigmas: torch.Tensor) -> torch.Tensor:
        return 1 - sigmas

    def encode_captions(self, models: Any, captions: list[str], device: torch.device | str = "cpu") -> DitConditioning:
        with torch.no_grad():  # encode_prompt rewrites its list in place, hence the copy
            embeds, _ = models.encode_prompt(prompt=list(captions), device=torch.device(device),
                                             do_classifier_free_guidance=False,
                                             max_sequence_length=self.max_caption_tokens)
        return DitConditioning(embeds=list(embeds))

    def velocity(self, model: Any, noisy: torch.Tensor, sigmas: torch.Tensor,
                 conditioning: DitConditioning) -> torch.Tensor:
        frames = list(noisy.unsqueeze(2).unbind(0))
        out = model(frames, self.model_timestep(sigmas), list(conditioning.embeds), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def base_model_version(self, model: Any) -> str:
        return "zimage"

    def sampling_defaults(self, turbo: bool = False) -> SamplingDefaults:
        # Turbo: 8 steps at CFG 1 (ComfyUI's template); De-Turbo: 25 steps at CFG 3 (ai-toolkit's preset).
        if turbo:
            return SamplingDefaults(steps=8, cfg_scale=1.0, pipeline=self.pipeline_class)
        return SamplingDefaults(steps=25, cfg_scale=3.0, pipeline=self.pipeline_class)

    @staticmethod
    def pipeline_guidance(cfg_scale: float) -> float:
        # ZImagePipeline guides as pos + g * (pos - neg), on for any g > 0: the usual CFG c is g = c - 1.
        return max(0.0, cfg_scale - 1.0)



def store_base_in_fp8(model: Any, compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """kohya's ``fp8_base`` for a diffusers transformer: weights stored in float8 (e4m3), computed in ``compute_dtype``.

    diffusers' layerwise casting upcasts each layer's weights for its forward only; norms and embeddings
    stay in ``compute_dtype``. Call it before adding LoRA (:class:`training.dit_lora.DitLora` keeps the
    LoRA weights in float32).
    """
    model.to(compute_dtype)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    return model


DIT_IMPLEMENTATIONS: dict[str, DitFamily] = {"sd3": SD3Family(), "zimage": ZImageFamily()}


def family(name: str) -> ModelFamily:
    """The implementation of a DiT family (``"sd3"`` or ``"zimage"``, as :func:`detect_family` names them)."""
    if name not in DIT_IMPLEMENTATIONS:
        raise UnsupportedModelError(f"model family {name!r} has no DiT implementation; use one of "
                                    f"{', '.join(DIT_FAMILIES)} (SD 1.x and SDXL train through the UNet trainer)")
    return DIT_IMPLEMENTATIONS[name]
