"""The training loop: one kohya-style LoRA run from a :class:`TrainingConfig`.

Per epoch, in order: train, save the checkpoint when due, save the training state, sample images when
due, then call ``on_epoch_end``. So when the callback raises (a study pruning the trial), everything of
that epoch is already on disk and ``train(cfg, resume=True)`` continues from it.

After an optimizer step whose number is a multiple of ``save_every_n_steps`` (the last step excepted),
``{output_name}-step{step:08d}.safetensors`` and a mid-epoch training state are saved; after one that is
a multiple of ``sample_every_n_steps``, sample images. A run resumed from a mid-epoch state continues
with the next batch of that epoch.

Checkpoints: ``{output_name}-{epoch:06d}.safetensors`` every ``save_every_n_epochs`` before the last
epoch, ``{output_name}.safetensors`` at the end (as sd-scripts). A training state is written with every
checkpoint, after every epoch when ``save_state = true``, and after the last epoch; the two newest are
kept. The run stops after exactly ``max_train_steps`` optimizer steps when ``max_train_epochs`` is unset,
its last epoch cut short. Attention runs on PyTorch SDPA (diffusers' default processor).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from training.config import TrainingConfig, load_training_config, parse_resolution, write_config
from training.data import TrainDataset
from training.errors import ConfigError, LoraSearchError
from training import fast
from training.devices import autocast, pick_device, pin, to_device
from training.models import encode_captions, encode_tokens, load_models
from training.sampling import load_prompts, preserved_rng, sample_dit_images, sample_images

log = logging.getLogger(__name__)

MIXED_PRECISION_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# Keys that may differ between a saved state and the config it resumes with (they do not change training).
RESUME_FREE_KEYS = frozenset({
    "output_dir", "logging_dir", "sample_prompts", "sample_every_n_epochs", "sample_sampler",
    "save_every_n_epochs", "save_every_n_steps", "sample_every_n_steps", "save_state", "training_comment",
    "max_data_loader_n_workers", "persistent_data_loader_workers", "metadata_trigger_phrase", "save_precision",
    "log_with", "log_prefix", "log_tracker_name", "wandb_run_name",
})


@dataclass
class EpochEnd:
    """What ``on_epoch_end`` receives after an epoch's files are saved."""

    epoch: int  # 1-based
    global_step: int
    checkpoint: Optional[Path]  # None when no checkpoint was saved this epoch
    samples: list[Path]  # empty when no samples were generated this epoch
    run_dir: Path  # = output_dir
    losses: list[float] = field(default_factory=list)  # each optimizer step's loss (this process's steps)


@dataclass
class TrainResult:
    """The finished run: its final LoRA file, epochs and optimizer steps; seconds in the epoch loop, and of
    those the seconds spent compiling the step (the calls that compiled a graph)."""

    checkpoint: Path
    epochs: int
    steps: int
    seconds: float = 0.0
    compile_seconds: float = 0.0


@dataclass
class _Run:
    cfg: TrainingConfig
    out: Path
    device: torch.device
    autocast_dtype: Optional[torch.dtype]
    seed: int
    models: Any
    network: Any
    dataset: Any
    noise_scheduler: Any
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    latents: Optional[list] = None
    flipped: Optional[list] = None
    steps_per_epoch: int = 0
    epochs: int = 0
    total_steps: int = 0
    global_step: int = 0
    started_at: float = field(default_factory=time.time)
    unet_loss: Any = None  # fast.UnetLoss: the (compiled) UNet forward and loss
    text_encode: Any = None  # fast.Compiled over models.encode_tokens, when captions are not cached
    compiling: bool = False  # torch.compile was asked for (its graphs are dropped when the run ends)
    grad_buffers: bool = False  # gradients accumulate in buffers of their own (zeroed, never freed)
    phase: str = ""  # what the step is doing (forward, backward, optimizer step), for the fallback's log line
    captions: Any = None  # fast.CaptionCache when the text encoders are frozen and captions fixed
    offloaded: list = field(default_factory=list)  # frozen models kept on the CPU between sample images
    log: Any = None  # tb_log.TrainingLog when the config logs to TensorBoard or W&B


def train(cfg: TrainingConfig, *, resume: bool = False, on_epoch_end: Optional[Callable[[EpochEnd], None]] = None,
          latent_cache_dir: str | Path | None = None) -> TrainResult:
    """Train a LoRA as ``cfg`` says; with ``resume`` continue from the newest complete state in output_dir.

    Latents are cached under ``latent_cache_dir`` (default ``$LORA_SEARCH_CACHE`` or
    ``~/.cache/lora-search``) when ``cache_latents`` is set. Exceptions from ``on_epoch_end`` propagate.
    """
    out = _output_dir(cfg)
    run = _setup(cfg, out, latent_cache_dir)
    out.mkdir(parents=True, exist_ok=True)  # only once the config, data and model are known to be usable
    try:
        done, start_batch = _resume(run) if resume else (0, 0)
        run.log = _open_log(run)
        _write_config_copy(cfg, out)
        if done >= run.epochs:
            log.info("the run in %s already finished (epoch %d, step %d)", out, done, run.global_step)
        else:
            log.info("training %d epochs, %d steps (%d per epoch) from epoch %d, step %d", run.epochs,
                     run.total_steps, run.steps_per_epoch, done + 1, run.global_step)
        started = time.perf_counter()
        for epoch in range(done + 1, run.epochs + 1):
            losses = _train_epoch(run, epoch, start_batch if epoch == done + 1 else 0)
            event = _end_epoch(run, epoch, losses)
            _log_epoch(run, event)
            if on_epoch_end is not None:
                on_epoch_end(event)
        final = _final_path(run)
        if not final.is_file():  # a resume of a finished run whose final file went missing
            _save_checkpoint(run, run.epochs, final)
        result = TrainResult(checkpoint=final, epochs=run.epochs, steps=run.global_step,
                             seconds=time.perf_counter() - started, compile_seconds=_compile_seconds(run))
        _log_times(run, result)
        return result
    finally:
        if run.log is not None:
            run.log.close()
        _release(run)


def _compile_seconds(run: _Run) -> float:
    return sum(c.compile_seconds for c in (run.unet_loss, run.text_encode) if c is not None)


def _log_times(run: _Run, result: TrainResult) -> None:
    if not run.compiling:
        return
    graphs = sum(len(c.compiles) for c in (run.unet_loss, run.text_encode) if c is not None)
    log.info("training took %.1f s: %.1f s compiling %d graph(s) of the step, %.1f s training", result.seconds,
             result.compile_seconds, graphs, result.seconds - result.compile_seconds)


def _output_dir(cfg: TrainingConfig) -> Path:
    if not cfg.output_dir:
        raise ConfigError('output_dir is not set; add output_dir = "runs/my_lora" under [saving]')
    return Path(cfg.output_dir)


def _release(run: _Run) -> None:
    if run.compiling:
        fast.release_compiled()
    run.models = run.network = run.optimizer = run.unet_loss = run.text_encode = run.captions = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- set-up --------------------------------------------------------------------------------------------

def _setup(cfg: TrainingConfig, out: Path, latent_cache_dir: str | Path | None) -> _Run:
    dit = _check_supported(cfg)
    if cfg.sample_prompts:
        load_prompts(cfg)  # a bad prompt file fails now, not after the first epoch
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
    seed_everything(seed)
    dataset = TrainDataset.from_config(cfg)
    run = _build_run(cfg, out, _load_models(cfg, dit), dataset, seed, pick_device())
    _plan_steps(run)
    _cache_latents(run, latent_cache_dir)
    _build_optimization(run)
    _setup_fast(run)
    return run


def _load_models(cfg: TrainingConfig, dit: Optional[str]) -> Any:
    """SD 1.x/SDXL ``SDModels``, or a DiT family's ``DitModels`` (see :mod:`training.dit_run`)."""
    if dit is None:
        return load_models(cfg)
    from training.dit_run import load_dit_models

    return load_dit_models(cfg, dit, MIXED_PRECISION_DTYPES[cfg.mixed_precision])


def _is_dit(run: _Run) -> bool:
    """The run trains an SD3/Z-Image transformer (rectified flow, :mod:`training.dit_run`), not an SD 1.x/SDXL UNet."""
    return _dit_models(run.models)


def _dit_models(models: Any) -> bool:
    return hasattr(models, "transformer")


def _build_run(cfg: TrainingConfig, out: Path, models: Any, dataset: Any, seed: int, device: torch.device) -> _Run:
    """The run's LoRA network on ``models``, placed on ``device`` (no steps planned, no optimizer yet)."""
    dit = _dit_models(models)
    run = _Run(cfg=cfg, out=out, device=device, autocast_dtype=MIXED_PRECISION_DTYPES[cfg.mixed_precision],
               seed=seed, models=models, network=_build_network(cfg, models), dataset=dataset,
               noise_scheduler=None if dit else _noise_scheduler(cfg))
    _place_models(run)
    return run


class TrainStep:
    """The trainer's optimizer step on batches of cached latents handed to it: no dataset, no output folder.

    Set up as :func:`train` sets up a run (LoRA network on ``models``, placement, optimizer and schedule
    from ``cfg``, the fast path of :mod:`training.fast` with the embeddings of ``captions`` cached when
    the text encoders are frozen), and each call is the loop's optimizer step, run-time fallback included. For
    measuring the step (``benchmarks/train_step.py``); ``cfg.max_train_steps`` bounds the LR schedule.
    """

    def __init__(self, cfg: TrainingConfig, models: Any, captions: Iterable[str] = (),
                 device: Optional[torch.device] = None) -> None:
        if _check_supported(cfg) is not None:
            raise ConfigError("TrainStep measures the SD 1.x/SDXL UNet step; give it an SD 1.x/SDXL model")
        self.run = _build_run(cfg, Path(cfg.output_dir or "."), models, None, cfg.seed or 0, device or pick_device())
        steps = cfg.max_train_steps or 10**6
        self.run.steps_per_epoch, self.run.epochs, self.run.total_steps = steps, 1, steps
        _build_optimization(self.run)
        self.run.latents = []  # batches bring latents: the VAE is not needed in a step
        _setup_fast(self.run, captions=set(captions))
        self.params = [p for group in self.run.optimizer.param_groups for p in group["params"]]
        self.losses = fast.LossLog()

    def __call__(self, batches: list) -> None:
        """One optimizer step over ``batches`` (``gradient_accumulation_steps`` micro-batches of cached latents)."""
        _train_step(self.run, [pin(batch) for batch in batches], self.params, self.losses)

    @property
    def compiled(self) -> bool:
        """Whether the step runs compiled (False when not asked for, or after a fallback)."""
        return _compiled(self.run)

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far."""
        return _compile_seconds(self.run)

    def close(self) -> None:
        """Drop the compiled graphs and the models' references (free the GPU for the next measurement)."""
        _release(self.run)


def _check_supported(cfg: TrainingConfig) -> Optional[str]:
    """Refuse what the built-in trainer cannot do with ``cfg``; returns the DiT family (None: SD 1.x/SDXL)."""
    from training.families import check_family_config, dit_family_of

    dit = dit_family_of(cfg.pretrained_model_name_or_path)
    check_family_config(cfg, dit or "SD 1.x/SDXL", builtin=True)  # refuses keys the family would ignore
    if cfg.network_train_unet_only and cfg.network_train_text_encoder_only:
        raise ConfigError("network_train_unet_only and network_train_text_encoder_only are both true; set one")
    if cfg.network_args:
        raise ConfigError(f"network_args = {cfg.network_args!r}: the built-in trainer has no extra network options "
                          "(conv_dim, rank_dropout, ...); remove them")
    if cfg.full_fp16:
        raise ConfigError("full_fp16 = true: fp16 LoRA weights cannot be gradient-scaled; use mixed_precision = "
                          '"fp16" alone, or "bf16" with full_bf16')
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError('mixed_precision = "fp16" needs a CUDA GPU; use "bf16" or "no" on this machine')
    if dit is not None and (cfg.fp8_base or cfg.fp8_base_unet) and cfg.mixed_precision == "no":
        raise ConfigError('fp8_base: weights stored in fp8 compute in bf16 or fp16; set mixed_precision = "bf16"')
    if dit is not None and cfg.full_bf16:
        raise ConfigError(f"full_bf16 = true: the built-in trainer keeps {dit} LoRA weights in float32 (bf16 "
                          "compute comes from mixed_precision); remove it")
    if dit is not None and cfg.torch_compile:
        raise ConfigError(f"torch_compile = true: the built-in trainer runs the {dit} transformer uncompiled; "
                          "remove it")
    return dit


def _build_network(cfg: TrainingConfig, models: Any) -> Any:
    from training.network import LoraNetwork

    if _dit_models(models):
        from training.dit_run import build_dit_network

        network = build_dit_network(cfg, models)
        log.info("LoRA modules: %d in the %s transformer%s", len(network.targets), models.family.name,
                 " (attention only)" if cfg.network_attention_only else "")
        return network
    network = LoraNetwork(
        models.unet, models.text_encoders, dim=cfg.network_dim, alpha=cfg.network_alpha,
        dropout=cfg.network_dropout, train_unet=not cfg.network_train_text_encoder_only,
        train_text_encoder=not cfg.network_train_unet_only, sgm_names=models.is_sdxl,
    )
    if cfg.network_weights:
        network.load(cfg.network_weights)
    log.info("LoRA modules: %s", ", ".join(f"{k} {v}" for k, v in network.module_counts().items()))
    return network


def _noise_scheduler(cfg: TrainingConfig) -> Any:
    from diffusers import DDPMScheduler

    # sd-scripts trains every SD model on this schedule, whatever the checkpoint's sampling scheduler.
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, prediction_type="v_prediction" if cfg.v_parameterization else "epsilon")


def _place_models(run: _Run) -> None:
    """Move models to the device; frozen weights in the mixed-precision dtype, LoRA weights in float32."""
    cfg, models = run.cfg, run.models
    weight_dtype = run.autocast_dtype or torch.float32
    lora_dtype = weight_dtype if (cfg.full_fp16 or cfg.full_bf16) else torch.float32
    vae_dtype = torch.float32 if (cfg.no_half_vae or run.autocast_dtype is None) else weight_dtype
    if _is_dit(run):
        from training.dit_run import place_dit_models

        run.offloaded += place_dit_models(models, run.device, weight_dtype, vae_dtype, cfg.gradient_checkpointing)
        return
    if next(models.vae.parameters()).dtype != vae_dtype:
        models.vae.to(dtype=vae_dtype)
    models.vae.to(run.device).requires_grad_(False).eval()
    trains_te = any(p.prefix != "lora_unet" for p in run.network.parts)
    for module in [models.unet, *models.text_encoders]:
        module.to(run.device)
        for name, param in module.named_parameters():
            param.data = param.data.to(lora_dtype if "lora_" in name else weight_dtype)
        module.train(module is models.unet or trains_te)
    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if trains_te:
            for te in models.text_encoders:
                _enable_te_checkpointing(te)


def _enable_te_checkpointing(te: Any) -> None:
    # Non-reentrant checkpointing lets gradients reach LoRA weights behind frozen embeddings.
    if hasattr(te, "activation_checkpointing_enable"):  # transformers >= 5.x
        te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _plan_steps(run: _Run) -> None:
    """Optimizer steps per epoch, epochs and total steps, as sd-scripts counts them."""
    cfg = run.cfg
    batches = run.dataset.batches_per_epoch(cfg.train_batch_size)
    run.steps_per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
    if cfg.max_train_epochs:
        run.epochs = cfg.max_train_epochs
        run.total_steps = run.epochs * run.steps_per_epoch
    else:
        run.total_steps = cfg.max_train_steps
        run.epochs = math.ceil(run.total_steps / run.steps_per_epoch)


def _build_optimization(run: _Run) -> None:
    from training.optim import build_optimizer, build_scheduler

    cfg = run.cfg
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    groups = run.network.param_groups(cfg.effective_unet_lr, te_lr)
    run.optimizer = build_optimizer(cfg, groups)
    run.scheduler = build_scheduler(cfg, run.optimizer, run.total_steps)
    if cfg.mixed_precision == "fp16":
        run.scaler = torch.amp.GradScaler(run.device.type)


def _trains_text_encoder(run: _Run) -> bool:
    return any(part.prefix != "lora_unet" for part in run.network.parts)


def _setup_fast(run: _Run, captions: Optional[set[str]] = None) -> None:
    """The fast step (see :mod:`training.fast`): compiled UNet loss, cached captions, frozen models off the GPU.

    ``captions`` are the texts to cache (default: the dataset's, when it can list them).
    """
    cfg, cuda = run.cfg, run.device.type == "cuda"
    plain = fast.eager_forced()
    if _is_dit(run):
        _setup_dit_fast(run, captions)
        return
    if cuda:
        fast.configure_cuda()
        if not plain:
            run.models.unet.to(memory_format=torch.channels_last)
    compile_ = run.compiling = fast.should_compile(cfg.torch_compile, run.device)
    if compile_:
        run.network.scale_as_tensors(run.device)
    run.unet_loss = fast.UnetLoss(run.models.unet, run.autocast_dtype, run.device, compile_, cfg.dynamo_backend)
    if compile_:
        shapes = f"{len(run.dataset.step_shapes(cfg.train_batch_size))} batch shape(s), one per bucket; " \
            if run.dataset is not None else ""
        log.info("compiling the training step with torch.compile (%s%s); each new batch shape takes a while the "
                 "first time (%scached in %s)", cfg.dynamo_backend, ", CUDA graphs" if run.unet_loss.cuda_graphs else "",
                 shapes, fast.compile_cache_dir())
    # Moved once here, so add_noise / get_velocity / compute_snr never copy it to the GPU in a step.
    run.noise_scheduler.alphas_cumprod = run.noise_scheduler.alphas_cumprod.to(run.device)
    _setup_conditioning(run, captions, plain)
    # A backward pass replayed as a CUDA graph hands out gradients in memory the next replay reuses. With
    # one batch per step the optimizer is done with them by then; accumulated over several, they must
    # be added into buffers of their own (autograd adds in place into an existing .grad).
    run.grad_buffers = cfg.gradient_accumulation_steps > 1 and run.unet_loss.cuda_graphs
    if run.latents is not None and not plain:
        run.offloaded.append(run.models.vae)
    if cuda and run.offloaded:
        for module in run.offloaded:
            module.to("cpu")
        torch.cuda.empty_cache()


def _setup_dit_fast(run: _Run, captions: Optional[set[str]]) -> None:
    """A DiT step runs uncompiled; fixed captions are encoded once, the VAE waits on the CPU with cached latents."""
    if run.device.type == "cuda":
        fast.configure_cuda()
    if captions is None and run.dataset is not None:
        captions = run.dataset.caption_set()
    if captions is not None:
        from training.dit_run import DitCaptionCache

        run.captions = DitCaptionCache(run.models, captions, run.device, run.autocast_dtype)
        log.info("text embeddings of %d captions cached; the text encoders wait on the CPU", len(run.captions))
    else:
        log.info("shuffled captions are encoded every step: the text encoders stay on %s", run.device)
        for encoder in run.offloaded:
            encoder.to(run.device)
        run.offloaded = []
    if run.latents is not None and run.device.type == "cuda":
        run.models.vae.to("cpu")
        run.offloaded.append(run.models.vae)
        torch.cuda.empty_cache()


def _setup_conditioning(run: _Run, captions: Optional[set[str]], plain: bool) -> None:
    """Cache every caption's embedding (frozen text encoders, fixed captions), else encode in each step."""
    cfg, frozen = run.cfg, not _trains_text_encoder(run)
    if not plain and frozen and captions is None and run.dataset is not None:
        captions = run.dataset.caption_set()
    if plain or not frozen or captions is None:
        encode = functools.partial(encode_tokens, run.models, clip_skip=cfg.clip_skip)
        run.text_encode = fast.Compiled(encode, "text encoder", run.device, run.compiling, cfg.dynamo_backend)
        return
    run.captions = fast.CaptionCache(run.models, captions, run.device, cfg.clip_skip, cfg.max_token_length,
                                     run.autocast_dtype)
    log.info("text embeddings of %d captions cached; the text encoder%s wait on the CPU", len(run.captions),
             "s" if len(run.models.text_encoders) > 1 else "")
    run.offloaded += run.models.text_encoders


def default_cache_dir() -> Path:
    """Where latents are cached when no folder is given."""
    return fast.cache_root() / "latents"


def _cache_latents(run: _Run, cache_dir: str | Path | None) -> None:
    import tempfile

    from training.latent_cache import LatentCache

    cfg = run.cfg
    if not cfg.cache_latents or cfg.color_aug:
        if cfg.cache_latents:
            log.warning("color_aug changes pixels every step; latents are not cached")
        return
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    temp = None if cfg.cache_latents_to_disk else tempfile.TemporaryDirectory(prefix="lora-search-latents-")
    cache = LatentCache(temp.name if temp else folder)
    # A fixed generator makes cached latents independent of the run, and the training streams untouched.
    with preserved_rng():
        run.latents, run.flipped = cache.encode_dataset(run.dataset, _encoder(run, seeded=True), _vae_key(run),
                                                        cfg.vae_batch_size)
    if temp:
        temp.cleanup()


def _vae_key(run: _Run) -> str:
    """The identity of the VAE weights, dtype and scaling for the latent cache."""
    import hashlib

    vae = run.models.vae
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return f"{digest.hexdigest()}|{next(vae.parameters()).dtype}|{vae.config.scaling_factor}|{_shift(vae)}"


def _shift(vae: Any) -> float:
    """The VAE's latent shift (SD3 and Flux VAEs: latents are ``(z - shift) * scale``; SD VAEs have none)."""
    return getattr(vae.config, "shift_factor", None) or 0.0


def _encoder(run: _Run, seeded: bool = False, to_cpu: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    vae = run.models.vae

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(run.device.type).manual_seed(0) if seeded else None
        pixels = to_device(pixels, run.device).to(next(vae.parameters()).dtype)
        raw = vae.encode(pixels).latent_dist.sample(generator=generator)
        latents = ((raw - _shift(vae)) * vae.config.scaling_factor).float()
        return latents.cpu() if to_cpu else latents

    return encode


# --- resume --------------------------------------------------------------------------------------------

def _resume(run: _Run) -> tuple[int, int]:
    """Load the newest complete state into the run; return (epochs it finished, batches of the next one done)."""
    from training.state import latest_state, load_state, restore_rng

    folder = latest_state(run.out)
    if folder is None:
        log.warning("no saved training state in %s; starting from epoch 1", run.out / "state")
        return 0, 0
    state = load_state(folder)
    _check_resume_config(run.cfg, state.config, folder)
    if state.total_steps and state.total_steps != run.total_steps:
        raise LoraSearchError(f"cannot resume from {folder}: the run now has {run.total_steps} steps, the saved one "
                              f"{state.total_steps} (were images added or removed?); restore the dataset or use a new output_dir")
    run.network.load_kohya_state_dict(state.lora, str(folder))
    run.optimizer.load_state_dict(state.optimizer)
    run.scheduler.load_state_dict(state.scheduler)
    if run.scaler is not None and state.scaler:
        run.scaler.load_state_dict(state.scaler)
    restore_rng(state.rng)
    run.seed, run.global_step = state.seed, state.global_step
    log.info("resuming from %s (epoch %d, batch %d, step %d)", folder, state.epoch + 1, state.batch,
             state.global_step)
    return state.epoch, state.batch


def _training_keys(cfg: TrainingConfig | dict) -> dict:
    values = cfg if isinstance(cfg, dict) else cfg.to_dict()
    return {k: v for k, v in values.items() if k not in RESUME_FREE_KEYS}


def _check_resume_config(cfg: TrainingConfig, saved: dict, folder: Path) -> None:
    now, then = _training_keys(cfg), _training_keys(saved)
    if now.get("seed") is None:
        now.pop("seed", None), then.pop("seed", None)  # an unseeded run resumes with its recorded seed
    changed = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
    if changed:
        raise LoraSearchError(f"cannot resume from {folder}: the config changed ({', '.join(changed)}); "
                              "restore those keys or use a new output_dir")


def _write_config_copy(cfg: TrainingConfig, out: Path) -> None:
    target = out / "config.toml"
    if target.is_file():
        try:
            if load_training_config(target) == cfg:
                return  # the run was started from this very file (or an identical one)
        except ConfigError:
            pass
    write_config(target, cfg.to_dict(include_defaults=False), header="# the config this run trained with")


# --- the loop ------------------------------------------------------------------------------------------

def _train_epoch(run: _Run, epoch: int, start_batch: int = 0) -> list[float]:
    """The epoch's batches from ``start_batch`` on, with gradient accumulation; updates run.global_step.

    Returns the loss of each optimizer step taken.
    """
    cfg = run.cfg
    accum = cfg.gradient_accumulation_steps
    batches = run.dataset.epoch_batches(cfg.train_batch_size, run.seed, epoch)
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    if run.grad_buffers:
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
    bar = _progress(run, epoch)
    losses, started, steps_before = fast.LossLog(), time.perf_counter(), run.global_step
    compiled_before = _compile_seconds(run)

    def make(batch_no: int) -> Any:
        return pin(run.dataset.make_batch(batches[batch_no], run.seed, epoch, batch_no, run.latents,
                                          run.flipped, pad_to=cfg.train_batch_size))

    todo, window = range(start_batch, len(batches)), []
    for batch_no, batch in _prefetched(make, todo, cfg.max_data_loader_n_workers):
        if run.global_step >= run.total_steps:
            break
        window.append(batch)
        if (batch_no + 1) % accum == 0 or batch_no == len(batches) - 1:
            _train_step(run, window, params, losses)
            window = []
            _show_step(run, bar, epoch, losses)
            _after_step(run, epoch, batches_done=batch_no + 1)
            if run.log is not None:
                run.log.step(run.global_step, run.scheduler.get_last_lr(), losses)
    if bar is not None:
        bar.close()
    values = losses.values()  # the epoch's one wait for the GPU
    seconds = time.perf_counter() - started
    compiling = _compile_seconds(run) - compiled_before
    log.info("epoch %d/%d: loss %.4f, lr %.2e, %.2f it/s, step %d/%d, %.1f s%s", epoch, run.epochs,
             float(np.mean(values)) if values else float("nan"), _lr(run),
             (run.global_step - steps_before) / max(seconds, 1e-9), run.global_step, run.total_steps, seconds,
             f" ({compiling:.1f} s of it compiling)" if compiling else "")
    return values


def _prefetched(make: Callable[[int], Any], numbers: range, workers: int) -> Iterator[tuple[int, Any]]:
    """``(n, make(n))`` for each of ``numbers`` in order, built up to ``2 * workers`` ahead on worker threads.

    Batches depend only on their (seed, epoch, batch number), never on the order they are built in, so
    threads change speed, not results. Image decoding releases the GIL.
    """
    if workers <= 0:
        yield from ((n, make(n)) for n in numbers)
        return
    from concurrent.futures import ThreadPoolExecutor

    ahead = 2 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batches") as pool:
        pending = [pool.submit(make, n) for n in numbers[:ahead]]
        for i, n in enumerate(numbers):
            batch = pending[i].result()
            pending[i] = None  # free it once handed out
            if i + ahead < len(numbers):
                pending.append(pool.submit(make, numbers[i + ahead]))
            yield n, batch


# Steps between progress-bar loss updates: reading a loss waits for the GPU to drain its queue.
SHOW_LOSS_EVERY = 20


def _show_step(run: _Run, bar: Any, epoch: int, losses: fast.LossLog) -> None:
    if bar is None:
        return
    bar.update(1)
    if run.global_step % SHOW_LOSS_EVERY == 0 or run.global_step == 1:
        bar.set_postfix(epoch=epoch, loss=f"{losses.last(SHOW_LOSS_EVERY):.4f}", lr=f"{_lr(run):.2e}")


def _due(step: int, every: Optional[int]) -> bool:
    return bool(every) and step % every == 0


def _after_step(run: _Run, epoch: int, batches_done: int) -> None:
    """Save what is due after an optimizer step of ``epoch``: step checkpoint and state, then samples."""
    cfg, step = run.cfg, run.global_step
    # The last step's checkpoint is the final file, written at the end of its epoch.
    if _due(step, cfg.save_every_n_steps) and step < run.total_steps:
        # As sd-scripts, a step checkpoint records the epochs completed before it.
        _save_checkpoint(run, epoch - 1, run.out / f"{_name(cfg)}-step{step:08d}.safetensors")
        _save_state(run, epoch - 1, batch=batches_done)
    if cfg.sample_prompts and _due(step, cfg.sample_every_n_steps):
        _sample(run, epoch, step)


def _progress(run: _Run, epoch: int) -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.total_steps, initial=run.global_step, desc=f"epoch {epoch}/{run.epochs}",
                unit="step", dynamic_ncols=True, leave=epoch == run.epochs)


def _lr(run: _Run) -> float:
    return float(run.scheduler.get_last_lr()[0])


def _backward(run: _Run, loss: torch.Tensor) -> None:
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
    else:
        loss.backward()


def _train_step(run: _Run, batches: list, params: list, losses: fast.LossLog) -> None:
    """One optimizer step over ``batches`` (its gradient-accumulation micro-batches); its loss goes to ``losses``.

    Run-time fallback: when the compiled step raises anything but running out of memory (while compiling,
    in the forward, the backward, a CUDA-graph replay, or the optimizer step that reads its gradients),
    the run logs one line with the cause, drops the compiled callables for the rest of the run, discards
    the gradients and losses of this step's micro-batches so far, and redoes the whole step uncompiled from
    the random numbers it started with. So no gradient counts twice, the step count is unchanged, and the
    run goes on as an uncompiled run would. Running out of memory propagates (a real limit of the config).
    Limits: an optimizer that fails part-way, after updating some weights, cannot be undone, so those
    weights take this step twice (a gradient an optimizer rejects fails its first parameter, which
    updates nothing); an error that leaves the GPU unusable fails the redo too, and with it the run.
    """
    draws = fast.StepRandom(run.device) if _compiled(run) else None
    try:
        _accumulate_and_apply(run, batches, params, losses)
    except Exception as exc:  # noqa: BLE001 - any failure of the compiled step is redone uncompiled
        if draws is None or fast.is_out_of_memory(exc):
            raise
        _fall_back(run, exc)
        losses.discard_micro()
        draws.restore()
        _accumulate_and_apply(run, batches, params, losses)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=not run.grad_buffers)
    run.global_step += 1
    losses.end_step()


def _compiled(run: _Run) -> bool:
    return any(c is not None and c.compiled for c in (run.unet_loss, run.text_encode))


def _accumulate_and_apply(run: _Run, batches: list, params: list, losses: fast.LossLog) -> None:
    for batch in batches:
        losses.add(_micro_step(run, batch, run.cfg.gradient_accumulation_steps))
    run.phase = "optimizer step"
    _apply_gradients(run, params)


def _fall_back(run: _Run, exc: Exception) -> None:
    """Drop the compiled step for the rest of the run, and the gradients of the step in progress."""
    log.warning("the compiled training step failed in the %s at step %d: %s; this step is redone uncompiled and "
                "the run goes on without compiling (set torch_compile = false to skip compilation)", run.phase,
                run.global_step + 1, fast.failure_cause(exc))
    for call in (run.unet_loss, run.text_encode):
        if call is not None:
            call.drop()
    run.optimizer.zero_grad(set_to_none=True)  # also lets go of gradients living in CUDA-graph memory
    run.grad_buffers = False
    fast.release_compiled()
    if run.scaler is not None:  # forget that this step's gradients were unscaled already
        scaler = torch.amp.GradScaler(run.device.type)
        scaler.load_state_dict(run.scaler.state_dict())
        run.scaler = scaler


def _apply_gradients(run: _Run, params: list) -> None:
    """Unscale (fp16), clip and apply the accumulated gradients."""
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    if run.cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, run.cfg.max_grad_norm)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()


def _micro_step(run: _Run, batch: Any, accum: int) -> torch.Tensor:
    """Forward and backward of one batch (its gradients added to the LoRA's); returns its loss."""
    shape = "x".join(map(str, (batch.latents if batch.latents is not None else batch.pixels).shape))
    run.phase = f"forward (input {shape})"
    fast.begin_step([run.text_encode, run.unet_loss])
    loss = _loss(run, batch)
    run.phase = f"backward (input {shape})"
    _backward(run, loss / accum)
    return loss


def _loss(run: _Run, batch: Any) -> torch.Tensor:
    """The (min-SNR weighted) noise- or v-prediction MSE of one batch.

    The random draws (noise, offset, timesteps) happen here, outside the compiled part, in the same order
    as always, so a compiled run and an eager one train on the same numbers.
    """
    cfg, sched = run.cfg, run.noise_scheduler
    if batch.latents is not None:
        latents = to_device(batch.latents, run.device)
    else:
        latents = _encoder(run, to_cpu=False)(batch.pixels)
    # Always a tensor, so that padded and full batches of a bucket run one compiled graph.
    weights = (to_device(batch.weights, run.device) if batch.weights is not None
               else torch.ones(latents.shape[0], device=run.device))
    if _is_dit(run):  # rectified flow: the family draws noise and sigma, and knows its model's call
        from training.dit_run import dit_loss

        return dit_loss(run.models, latents, _conditioning(run, batch), weights, run.device, run.autocast_dtype)
    noise = torch.randn_like(latents)
    if cfg.noise_offset:
        noise = apply_noise_offset(noise, cfg.noise_offset)
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=run.device)
    noisy = sched.add_noise(latents, noise, timesteps)
    hidden, added = _conditioning(run, batch)
    target = sched.get_velocity(latents, noise, timesteps) if cfg.v_parameterization else noise
    if cfg.min_snr_gamma:
        weights = weights * min_snr_weights(sched, timesteps, cfg.min_snr_gamma, cfg.v_parameterization)
    return run.unet_loss(noisy, timesteps, hidden, added, target, weights)


def _conditioning(run: _Run, batch: Any) -> tuple[torch.Tensor, Optional[dict]]:
    """The batch's text conditioning: from the caption cache, else from the text encoder(s)."""
    if run.captions is not None:
        return run.captions.lookup(batch.captions, batch)
    if _is_dit(run):  # shuffled captions: the frozen text encoders run every step
        with torch.no_grad(), autocast(run.device, run.autocast_dtype):
            return run.models.family.encode_captions(run.models.pipe, batch.captions, run.device)
    cfg = run.cfg
    # A frozen text encoder needs no activation memory.
    with autocast(run.device, run.autocast_dtype), torch.set_grad_enabled(_trains_text_encoder(run)):
        return encode_captions(run.models, batch.captions, run.device, cfg.clip_skip, batch, cfg.max_token_length,
                               encode=run.text_encode)


def apply_noise_offset(noise: torch.Tensor, offset: float) -> torch.Tensor:
    """sd-scripts' noise offset: one extra random value per sample and channel, scaled by ``offset``."""
    return noise + offset * torch.randn(noise.shape[0], noise.shape[1], 1, 1, device=noise.device, dtype=noise.dtype)


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Per-sample loss weights ``min(snr, gamma) / snr`` (``/ (snr + 1)`` for v-prediction)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return (clipped / (snr + 1) if v_prediction else clipped / snr).float()


def _open_log(run: _Run) -> Any:
    """The TensorBoard / W&B log the config asks for (see :mod:`training.tb_log`), or None."""
    from training import tb_log

    trains_unet = any(p.prefix == "lora_unet" for p in run.network.parts)  # only trained parts have layers
    names = tb_log.lr_tag_names(trains_unet, _trains_text_encoder(run))
    return tb_log.open_log(run.cfg, lr_names=names, window=run.steps_per_epoch, resumed_at=run.global_step)


def _log_epoch(run: _Run, event: EpochEnd) -> None:
    if run.log is not None:
        run.log.end_epoch(event.epoch, event.losses)
        run.log.samples(event.epoch, event.samples)
        run.log.flush()


# --- end of epoch --------------------------------------------------------------------------------------

def _end_epoch(run: _Run, epoch: int, losses: Optional[list[float]] = None) -> EpochEnd:
    """Save what is due for ``epoch``: checkpoint, state, samples (in that order)."""
    cfg = run.cfg
    last = epoch == run.epochs
    checkpoint = None
    if last:
        checkpoint = _save_checkpoint(run, epoch, _final_path(run))
    elif cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0:
        checkpoint = _save_checkpoint(run, epoch, run.out / f"{_name(cfg)}-{epoch:06d}.safetensors")
    if checkpoint is not None or cfg.save_state or last:
        _save_state(run, epoch)
    samples = []
    if cfg.sample_prompts and cfg.sample_every_n_epochs and epoch % cfg.sample_every_n_epochs == 0:
        samples = _sample(run, epoch)
    return EpochEnd(epoch=epoch, global_step=run.global_step, checkpoint=checkpoint, samples=samples, run_dir=run.out,
                    losses=list(losses or []))


def _sample(run: _Run, epoch: int, step: Optional[int] = None) -> list[Path]:
    """Sample images with the LoRA as it is now (offloaded models on the device meanwhile)."""
    sample = sample_dit_images if _is_dit(run) else sample_images
    with fast.models_on(run.offloaded, run.device):
        return sample(run.cfg, run.models, epoch, run.device, run.autocast_dtype, step=step)


def _name(cfg: TrainingConfig) -> str:
    return cfg.output_name or "last"


def _final_path(run: _Run) -> Path:
    return run.out / f"{_name(run.cfg)}.safetensors"


def _save_checkpoint(run: _Run, epoch: int, path: Path) -> Path:
    from training.network import save_dtype

    run.network.save(path, kohya_metadata(run, epoch), save_dtype(run.cfg.save_precision))
    log.info("saved %s", path)
    return path


def _save_state(run: _Run, epoch: int, batch: int = 0) -> None:
    """A state after ``epoch`` completed epochs and ``batch`` batches of the next one."""
    from training.state import TrainingState, capture_rng, save_state

    state = TrainingState(
        epoch=epoch, batch=batch, global_step=run.global_step, seed=run.seed,
        lora={k: v.float() for k, v in run.network.kohya_state_dict().items()},
        optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict() if run.scaler is not None else None, rng=capture_rng(),
        config=run.cfg.to_dict(), total_steps=run.total_steps,
    )
    save_state(run.out, state)


def kohya_metadata(run: _Run, epoch: int) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` metadata sd-scripts writes into a LoRA file."""
    cfg, models = run.cfg, run.models
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    resolution = parse_resolution(cfg.resolution) if cfg.resolution else (512, 512)
    values: dict[str, Any] = {
        "ss_network_module": cfg.network_module, "ss_network_dim": cfg.network_dim,
        "ss_network_alpha": run.network.alpha, "ss_network_dropout": cfg.network_dropout,
        "ss_base_model_version": models.base_model_version, "ss_v2": cfg.v2,
        "ss_v_parameterization": cfg.v_parameterization,
        "ss_learning_rate": cfg.learning_rate, "ss_unet_lr": cfg.effective_unet_lr, "ss_text_encoder_lr": te_lr,
        "ss_lr_scheduler": cfg.lr_scheduler, "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_optimizer": _optimizer_label(cfg), "ss_mixed_precision": cfg.mixed_precision,
        "ss_num_train_images": run.dataset.num_examples, "ss_num_epochs": run.epochs, "ss_epoch": epoch,
        "ss_steps": run.global_step, "ss_max_train_steps": run.total_steps,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps, "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_noise_offset": cfg.noise_offset, "ss_seed": run.seed, "ss_output_name": cfg.output_name,
        "ss_resolution": f"({resolution[0]}, {resolution[1]})", "ss_keep_tokens": cfg.keep_tokens,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate, "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_training_started_at": run.started_at, "ss_training_finished_at": time.time(),
        "ss_tag_frequency": json.dumps(_tag_frequency(run.dataset.items)),
        "ss_dataset_dirs": json.dumps(_dataset_dirs(run.dataset.items)),
        "ss_sd_model_name": Path(cfg.pretrained_model_name_or_path).name,
        "ss_vae_name": Path(cfg.vae).name if cfg.vae else None, "ss_clip_skip": cfg.clip_skip,
        "ss_training_comment": cfg.training_comment,
    }
    meta = {k: str(v) for k, v in values.items() if v is not None}
    if _is_dit(run):
        meta |= run.models.family.metadata(run.models.transformer)
        if run.models.adapter is not None:
            meta["ss_training_adapter"] = Path(cfg.training_adapter).name
    return meta | _modelspec(cfg, _architecture(run), resolution)


def _architecture(run: _Run) -> str:
    """The model's ``modelspec.architecture`` stem (sd-scripts' names for SD 1.x, SDXL and SD3/3.5)."""
    if not _is_dit(run):
        return "stable-diffusion-xl-v1-base" if run.models.is_sdxl else "stable-diffusion-v1"
    return {"medium": "stable-diffusion-v3-medium", "5-medium": "stable-diffusion-v3.5-medium",
            "5-large": "stable-diffusion-v3.5-large"}.get(run.models.base_model_version, "z-image")


def _optimizer_label(cfg: TrainingConfig) -> str:
    from training.optim import _optimizer_class

    cls, _ = _optimizer_class(cfg.optimizer_type)
    label = f"{cls.__module__}.{cls.__name__}"
    return label + (f"({','.join(cfg.optimizer_args)})" if cfg.optimizer_args else "")


def _modelspec(cfg: TrainingConfig, architecture: str, resolution: tuple[int, int]) -> dict[str, str]:
    # SDXL files use kohya's (generative-models) key names; SD 1.x and the DiT files diffusers' module paths.
    sgm = architecture == "stable-diffusion-xl-v1-base"
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sgm else "diffusers",
        "modelspec.title": _name(cfg), "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.prediction_type": "v" if cfg.v_parameterization else "epsilon",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if not architecture.startswith("stable-diffusion-v1") and not architecture.startswith("stable-diffusion-xl"):
        del spec["modelspec.prediction_type"]  # a flow model predicts neither
    if cfg.metadata_trigger_phrase:
        spec["modelspec.trigger_phrase"] = cfg.metadata_trigger_phrase
    return spec


def _tag_frequency(items: list) -> dict[str, dict[str, int]]:
    freq: dict[str, dict[str, int]] = {}
    for item in items:
        tags = freq.setdefault(item.path.parent.name, {})
        for tag in (t.strip() for t in item.caption.split(",")):
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
    return freq


def _dataset_dirs(items: list) -> dict[str, dict[str, int]]:
    dirs: dict[str, dict[str, int]] = {}
    for item in items:
        entry = dirs.setdefault(item.path.parent.name, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
    return dirs
