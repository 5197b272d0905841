"""Sample images from the config's prompt file, in ``{output_dir}/sample/``: SD 1.x/SDXL through their
diffusers pipelines with kohya's samplers (:func:`sample_images`), SD3/Z-Image through the family's own
pipeline and flow-matching scheduler (:func:`sample_dit_images`).

Images sampled at the end of an epoch (``sample_every_n_epochs``) are ``{output_name}_e{epoch:06d}_{index:02d}.png``;
images sampled after an optimizer step (``sample_every_n_steps``) are ``{output_name}_s{step:08d}_{index:02d}.png``.

``sample/prompts.json`` records the prompts exactly as generated (trigger substituted) so the evaluator can
score prompt adherence: ``{"trigger": str | null, "prompts": [{"index", "prompt", "negative_prompt",
"width", "height", "seed", "steps", "scale"}]}``.

Prompts are cut at 75 tokens, as the diffusers pipeline cuts them, unless ``max_token_length`` is 150 or
225: then they are encoded in chunks of 75 as training captions are (:func:`prompt_inputs`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from training.atomic import atomic_write_text, atomic_write_with
from training.config import TrainingConfig
from training.errors import ConfigError, LoraSearchError
from training.models import encode_captions, load_models
from training.devices import autocast, pick_device

log = logging.getLogger(__name__)

# Tokens a CLIP text encoder reads at once, besides <BOS> and <EOS>; longer prompts are encoded in chunks.
CHUNK_TOKENS = 75

# kohya sample_sampler names -> (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


def sample_dir(cfg: TrainingConfig) -> Path:
    return Path(cfg.output_dir or ".") / "sample"


def sample_path(cfg: TrainingConfig, epoch: int, index: int, step: Optional[int] = None) -> Path:
    """Where the image of prompt ``index`` at the end of ``epoch`` is saved; with ``step``, at that step."""
    when = f"e{epoch:06d}" if step is None else f"s{step:08d}"
    return sample_dir(cfg) / f"{_output_name(cfg)}_{when}_{index:02d}.png"


def _output_name(cfg: TrainingConfig) -> str:
    return cfg.output_name or "last"


def make_scheduler(name: str, base_config: dict) -> Any:
    """The diffusers scheduler for a kohya sampler name (``k_`` prefixes accepted)."""
    import diffusers

    key = name.lower().removeprefix("k_")
    if key not in SAMPLERS:
        raise ConfigError(f"sample_sampler = {name!r}: unknown sampler; use one of {', '.join(SAMPLERS)}")
    cls_name, extra = SAMPLERS[key]
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    return getattr(diffusers, cls_name).from_config({**config, **extra})


def load_prompts(cfg: TrainingConfig) -> list:
    """The config's sample prompts with ``{trigger}`` replaced by ``metadata_trigger_phrase``.

    For an SD3/Z-Image model, a line without ``--s``/``--l`` takes the family's steps and CFG scale
    (``turbo = true``: the step-distilled model's few steps without CFG), not kohya's 30 steps at 7.5.
    """
    from training.families import dit_family_of
    from training.prompts import load_prompt_file

    defaults = None
    name = dit_family_of(cfg.pretrained_model_name_or_path)
    if name is not None:
        from training.dit import family

        sampling = family(name).sampling_defaults(cfg.turbo)
        defaults = {"steps": sampling.steps, "scale": sampling.cfg_scale}
    return load_prompt_file(cfg.sample_prompts, cfg.metadata_trigger_phrase, defaults)


def write_prompts_json(cfg: TrainingConfig, prompts: list) -> Path:
    """Write ``sample/prompts.json`` atomically."""
    keys = ("index", "prompt", "negative_prompt", "width", "height", "seed", "steps", "scale")
    data = {"trigger": cfg.metadata_trigger_phrase,
            "prompts": [{k: getattr(p, k) for k in keys} | {"seed": prompt_seed(cfg, p)} for p in prompts]}
    return atomic_write_text(sample_dir(cfg) / "prompts.json", json.dumps(data, indent=1))


def prompt_seed(cfg: TrainingConfig, prompt: Any) -> int:
    """The seed prompt ``prompt`` samples with."""
    # A prompt without --d gets a fixed seed per prompt so every epoch's image is comparable.
    return prompt.seed if prompt.seed is not None else (cfg.seed or 0) + 1000 + prompt.index


def build_pipeline(models: Any, scheduler: Any) -> Any:
    """A diffusers pipeline over the (possibly LoRA-carrying) loaded models."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if models.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=models.vae, text_encoder=models.text_encoders[0], text_encoder_2=models.text_encoders[1],
            tokenizer=models.tokenizers[0], tokenizer_2=models.tokenizers[1], unet=models.unet, scheduler=scheduler)
    return StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoders[0], tokenizer=models.tokenizers[0], unet=models.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without disturbing the training random streams (so sampling never changes training)."""
    from training.state import capture_rng, restore_rng

    saved = capture_rng()
    try:
        yield
    finally:
        restore_rng(saved)


def sample_images(cfg: TrainingConfig, models: Any, epoch: int, device: torch.device,
                  autocast_dtype: Optional[torch.dtype] = None, step: Optional[int] = None) -> list[Path]:
    """Generate every prompt of ``cfg.sample_prompts`` with ``models`` as they are; return the image paths.

    The images are named for the end of ``epoch``, or for optimizer step ``step`` when it is given.
    """
    prompts = load_prompts(cfg)
    write_prompts_json(cfg, prompts)
    modules = [models.unet, models.vae, *models.text_encoders]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    pipe = build_pipeline(models, make_scheduler(cfg.sample_sampler, models.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    paths = []
    try:
        with preserved_rng(), torch.no_grad(), autocast(device, autocast_dtype):
            for prompt in prompts:
                pipe.scheduler = make_scheduler(getattr(prompt, "sampler", None) or cfg.sample_sampler,
                                                models.scheduler_config)
                path = sample_path(cfg, epoch, prompt.index, step)
                paths.append(_generate_one(cfg, pipe, prompt, path, device, models))
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    log.info("%s: %d sample images in %s", f"epoch {epoch}" if step is None else f"step {step}", len(paths),
             sample_dir(cfg))
    return paths


def sample_dit_images(cfg: TrainingConfig, models: Any, epoch: int, device: torch.device,
                      autocast_dtype: Optional[torch.dtype] = None, step: Optional[int] = None) -> list[Path]:
    """Every prompt of ``cfg.sample_prompts`` through an SD3/Z-Image family's pipeline (``models``: a
    :class:`training.dit_run.DitModels`) with the LoRA as it is and the training adapter removed: the same
    file names and ``prompts.json`` as :func:`sample_images`."""
    prompts = load_prompts(cfg)
    write_prompts_json(cfg, prompts)
    transformer = models.transformer
    was_training = transformer.training
    transformer.eval()
    models.pipe.set_progress_bar_config(disable=True)
    removed = models.adapter.removed() if models.adapter is not None else contextlib.nullcontext()
    paths = []
    try:
        with preserved_rng(), torch.no_grad(), autocast(device, autocast_dtype), removed:
            for prompt in prompts:
                image = models.family.sample(models.pipe, prompt.prompt, width=prompt.width, height=prompt.height,
                                             negative_prompt=prompt.negative_prompt, steps=prompt.steps,
                                             cfg_scale=prompt.scale, seed=prompt_seed(cfg, prompt))
                path = sample_path(cfg, epoch, prompt.index, step)
                paths.append(atomic_write_with(path, lambda tmp, im=image: im.save(tmp, format="PNG")))
    finally:
        transformer.train(was_training)
    log.info("%s: %d sample images in %s", f"epoch {epoch}" if step is None else f"step {step}", len(paths),
             sample_dir(cfg))
    return paths


def _generate_one(cfg: TrainingConfig, pipe: Any, prompt: Any, path: Path, device: torch.device,
                  models: Any) -> Path:
    generator = torch.Generator(device=device.type).manual_seed(prompt_seed(cfg, prompt))
    image = pipe(**prompt_inputs(cfg, models, pipe, prompt, device), width=prompt.width, height=prompt.height,
                 num_inference_steps=prompt.steps, guidance_scale=prompt.scale, generator=generator).images[0]
    return atomic_write_with(path, lambda tmp: image.save(tmp, format="PNG"))


def _text_inputs(prompt: Any) -> dict[str, Any]:
    return {"prompt": prompt.prompt, "negative_prompt": prompt.negative_prompt or None}


def prompt_inputs(cfg: TrainingConfig, models: Any, pipe: Any, prompt: Any, device: torch.device) -> dict[str, Any]:
    """The pipeline's text arguments for ``prompt``.

    Without a ``max_token_length`` over 75 that is the text (the pipeline keeps 75 tokens). With 150 or
    225 it is the conditioning :func:`training.models.encode_captions` builds for training captions
    (chunks of 75, ``clip_skip``), for the prompt and its negative padded to the same number of chunks:
    as many as the longer of the two needs, at most ``max_token_length / 75``.
    """
    if not cfg.max_token_length or cfg.max_token_length <= CHUNK_TOKENS:
        return _text_inputs(prompt)
    negative = prompt.negative_prompt or ""
    longest = max(count_tokens(models, text) for text in (prompt.prompt, negative))
    if longest > cfg.max_token_length:
        log.warning("sample prompt %d has %d tokens; only the first max_token_length = %d are used",
                    prompt.index, longest, cfg.max_token_length)
    chunks = min(max(1, math.ceil(longest / CHUNK_TOKENS)), cfg.max_token_length // CHUNK_TOKENS)
    positive = _embeddings(cfg, models, prompt.prompt, device, chunks * CHUNK_TOKENS)
    if not negative and models.is_sdxl and pipe.config.force_zeros_for_empty_prompt:
        # as the SDXL pipeline does for an empty negative prompt
        negative_embeds = {k: torch.zeros_like(v) for k, v in positive.items()}
    else:
        negative_embeds = _embeddings(cfg, models, negative, device, chunks * CHUNK_TOKENS)
    return positive | {f"negative_{k}": v for k, v in negative_embeds.items()}


def _embeddings(cfg: TrainingConfig, models: Any, text: str, device: torch.device, length: int) -> dict[str, Any]:
    hidden, added = encode_captions(models, [text], device, cfg.clip_skip, max_token_length=length)
    if added is None:
        return {"prompt_embeds": hidden}
    return {"prompt_embeds": hidden, "pooled_prompt_embeds": added["text_embeds"]}


def count_tokens(models: Any, text: str) -> int:
    """How many tokens ``text`` has for the model's tokenizers (the most of them), without <BOS>/<EOS>."""
    return max(len(tok(text, truncation=False, verbose=False).input_ids) - 2 for tok in models.tokenizers)


def generate_samples(cfg: TrainingConfig, lora_path: str | Path, epoch: int,
                     step: Optional[int] = None) -> list[Path]:
    """Regenerate the sample images of ``epoch`` (or of ``step``) from a saved LoRA checkpoint (loaded as diffusers does)."""
    if not cfg.sample_prompts:
        raise ConfigError("sample_prompts is not set; add a prompt file under [saving] to generate samples")
    lora_path = Path(lora_path)
    if not lora_path.is_file():
        raise LoraSearchError(f"LoRA checkpoint {lora_path} not found; check the path")
    device = pick_device()
    from training.families import dit_family_of

    dit = dit_family_of(cfg.pretrained_model_name_or_path)
    if dit is not None:  # SD3/Z-Image: the model without a training adapter is the one the LoRA is for
        from training.dit import family
        from training.dit_run import DitModels

        fam = family(dit).for_config(cfg)
        models = DitModels(family=fam, pipe=fam.load(cfg.pretrained_model_name_or_path))
        models.pipe.load_lora_weights(str(lora_path))
        models.pipe.to(device)
        return sample_dit_images(cfg, models, epoch, device, step=step)
    models = load_models(cfg)
    pipe = build_pipeline(models, make_scheduler(cfg.sample_sampler, models.scheduler_config))
    pipe.load_lora_weights(str(lora_path))
    pipe.to(device)
    return sample_images(cfg, models, epoch, device, step=step)
