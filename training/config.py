"""The kohya-style training config: the keys sd-scripts' ``train_network.py`` reads, loaded strictly.

A config is a TOML file; its ``[sections]`` are only grouping, as in sd-scripts (``--config_file``
flattens them). Every key must be a field of :class:`TrainingConfig`, and every field is named after a
``train_network.py`` argument, so a file written from this class also works with sd-scripts.
Defaults are sd-scripts' defaults where it has one, so a key left out means what it means there.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import tomli_w

from training.atomic import atomic_write_text
from training.errors import ConfigError

SECTIONS = ("model", "network", "optimizer", "training", "dataset", "saving")

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "SGDNesterov8bit", "Prodigy", "AdaFactor")
SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
MIXED_PRECISION = ("no", "fp16", "bf16")
LOG_WITH = ("tensorboard", "wandb", "all")
# networks.lora for SD 1.x/SDXL, networks.lora_sd3 for sd-scripts' sd3_train_network.py.
NETWORK_MODULES = ("networks.lora", "networks.lora_sd3")
# sd-scripts' --weighting_scheme choices (add_dit_training_arguments); "none" and "uniform" are the same.
WEIGHTING_SCHEMES = ("uniform", "none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
# torch.compile backends the trainer accepts (sd-scripts offers more, which need extra packages).
DYNAMO_BACKENDS = ("inductor", "cudagraphs", "aot_eager", "eager")

# Every argument name of sd-scripts' train_network.py (read from its argparse set-up). A key from this
# list that is not a TrainingConfig field is "not supported" rather than "unknown".
_KOHYA_ARGS_FILE = Path(__file__).with_name("kohya_args.txt")
# The names sd-scripts' sd3_train_network.py adds to those (add_dit_training_arguments and
# add_sd3_training_arguments); fields from this list are passed through to it by the kohya backend.
_KOHYA_SD3_ARGS_FILE = Path(__file__).with_name("kohya_sd3_args.txt")
# lora-search's own keys, for the SD3/Z-Image built-in trainer (sd-scripts has no such arguments; the kohya
# backend refuses them, see training.families.check_family_config). Every other field is an sd-scripts name.
LORA_SEARCH_KEYS = frozenset({"training_adapter", "turbo", "network_attention_only"})


def _opt(default: Any, section: str, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"section": section, "help": help})
    return field(default=default, metadata={"section": section, "help": help})


@dataclass
class TrainingConfig:
    """One LoRA training run, in sd-scripts' argument names."""

    # model
    pretrained_model_name_or_path: str = _opt("", "model", "SD 1.x/SDXL .safetensors/.ckpt file or diffusers folder")
    v2: bool = _opt(False, "model", "the checkpoint is Stable Diffusion 2.x")
    v_parameterization: bool = _opt(False, "model", "the model predicts v (SD 2.x 768-v); loss uses v targets")
    vae: Optional[str] = _opt(None, "model", "separate VAE file or folder replacing the checkpoint's")
    no_half_vae: bool = _opt(False, "model", "keep the VAE in float32 (avoids NaN with the SDXL VAE in fp16)")
    clip_skip: Optional[int] = _opt(None, "model", "use the output of the n-th last text-encoder layer")
    max_token_length: Optional[int] = _opt(None, "model", "75, 150 or 225 caption tokens")

    fp8_base: bool = _opt(False, "model", "store the frozen base model in fp8 (compute stays bf16/fp16)")
    fp8_base_unet: bool = _opt(False, "model", "fp8 for the UNet/DiT only, text encoders as they are")
    clip_l: Optional[str] = _opt(None, "model", "SD3: CLIP-L file for sd3_train_network.py")
    clip_g: Optional[str] = _opt(None, "model", "SD3: CLIP-G file for sd3_train_network.py")
    t5xxl: Optional[str] = _opt(None, "model", "SD3: T5-XXL file for sd3_train_network.py")
    t5xxl_max_token_length: int = _opt(256, "model", "SD3: T5-XXL caption tokens")
    apply_lg_attn_mask: bool = _opt(False, "model", "SD3: zero CLIP-L/G embeddings of padding tokens")
    apply_t5_attn_mask: bool = _opt(False, "model", "SD3: zero T5-XXL embeddings of padding tokens")
    clip_l_dropout_rate: float = _opt(0.0, "model", "SD3: probability of dropping CLIP-L's output")
    clip_g_dropout_rate: float = _opt(0.0, "model", "SD3: probability of dropping CLIP-G's output")
    t5_dropout_rate: float = _opt(0.0, "model", "SD3: probability of dropping T5-XXL's output")
    pos_emb_random_crop_rate: float = _opt(0.0, "model", "SD3.5 Medium: random crop rate of position embeddings")
    enable_scaled_pos_embed: bool = _opt(False, "model", "SD3.5 Medium: scale position embeddings per resolution")
    disable_mmap_load_safetensors: bool = _opt(False, "model", "read safetensors without mmap (faster on WSL)")
    blocks_to_swap: Optional[int] = _opt(None, "model", "SD3: transformer blocks kept in CPU memory (sd-scripts)")
    training_adapter: Optional[str] = _opt(None, "model", "Z-Image Turbo: LoRA file merged into the base for training "
                                           "and removed while sampling (built-in trainer)")
    turbo: bool = _opt(False, "model", "SD3.5/Z-Image Turbo (step-distilled): sample prompts without --s/--l take "
                       "its few steps and no CFG (built-in trainer)")

    # network
    network_module: str = _opt("networks.lora", "network", "networks.lora, or networks.lora_sd3 for sd-scripts' "
                               "sd3_train_network.py")
    network_dim: int = _opt(4, "network", "LoRA rank")
    network_alpha: float = _opt(1.0, "network", "LoRA alpha; the update is scaled by alpha / dim")
    network_dropout: Optional[float] = _opt(None, "network", "dropout on the LoRA down projection's output")
    network_args: list = _opt([], "network", "extra network options as key=value strings")
    network_weights: Optional[str] = _opt(None, "network", "LoRA file to start from")
    network_train_unet_only: bool = _opt(False, "network", "train the UNet LoRA only")
    network_train_text_encoder_only: bool = _opt(False, "network", "train the text-encoder LoRA only")
    network_attention_only: bool = _opt(False, "network", "SD3/Z-Image: LoRA on the blocks' attention projections "
                                        "only, not every Linear (built-in trainer)")

    # optimizer and schedule
    optimizer_type: str = _opt("AdamW", "optimizer", "one of " + ", ".join(OPTIMIZERS))
    optimizer_args: list = _opt([], "optimizer", 'extra optimizer arguments, e.g. ["weight_decay=0.01"]')
    learning_rate: float = _opt(2e-6, "optimizer", "base learning rate (UNet lr when unet_lr is unset)")
    unet_lr: Optional[float] = _opt(None, "optimizer", "UNet LoRA learning rate")
    text_encoder_lr: Optional[float] = _opt(None, "optimizer", "text-encoder LoRA learning rate")
    lr_scheduler: str = _opt("constant", "optimizer", "one of " + ", ".join(SCHEDULERS))
    lr_scheduler_num_cycles: int = _opt(1, "optimizer", "restarts of cosine_with_restarts")
    lr_scheduler_power: float = _opt(1.0, "optimizer", "power of the polynomial scheduler")
    lr_warmup_steps: int = _opt(0, "optimizer", "linear warmup steps")
    max_grad_norm: float = _opt(1.0, "optimizer", "gradient clipping norm; 0 disables")

    # training
    max_train_epochs: Optional[int] = _opt(None, "training", "epochs; overrides max_train_steps")
    max_train_steps: int = _opt(1600, "training", "optimizer steps when max_train_epochs is unset")
    train_batch_size: int = _opt(1, "training", "images per batch")
    gradient_accumulation_steps: int = _opt(1, "training", "batches per optimizer step")
    gradient_checkpointing: bool = _opt(False, "training", "recompute activations to save memory")
    mixed_precision: str = _opt("no", "training", "no, fp16 or bf16")
    full_fp16: bool = _opt(False, "training", "keep LoRA weights in fp16 too")
    full_bf16: bool = _opt(False, "training", "keep LoRA weights in bf16 too")
    save_precision: Optional[str] = _opt(None, "training", "dtype of saved LoRA files: float, fp16 or bf16")
    seed: Optional[int] = _opt(None, "training", "random seed")
    sdpa: bool = _opt(False, "training", "PyTorch scaled-dot-product attention (always used here)")
    torch_compile: Optional[bool] = _opt(None, "training", "torch.compile the UNet step (CUDA graphs on a GPU); "
                                         "unset: on with CUDA, off on the CPU")
    dynamo_backend: str = _opt("inductor", "training", "torch.compile backend: " + ", ".join(DYNAMO_BACKENDS))
    xformers: bool = _opt(False, "training", "refused: lora-search uses PyTorch SDPA")
    min_snr_gamma: Optional[float] = _opt(None, "training", "min-SNR loss weighting gamma; 0 or unset disables")
    noise_offset: Optional[float] = _opt(None, "training", "noise offset strength")
    weighting_scheme: str = _opt("uniform", "training", "flow-matching timestep sampling: "
                                 + ", ".join(WEIGHTING_SCHEMES))
    logit_mean: float = _opt(0.0, "training", "logit_normal: mean (> 0 trains more on noisy inputs)")
    logit_std: float = _opt(1.0, "training", "logit_normal: standard deviation")
    mode_scale: float = _opt(1.29, "training", "mode: how strongly mid-schedule noise levels are favoured")
    training_shift: float = _opt(1.0, "training", "flow-matching time shift; > 1 trains more on noisy inputs")
    cache_text_encoder_outputs: bool = _opt(False, "training", "encode captions once (no shuffle or caption dropout)")
    cache_text_encoder_outputs_to_disk: bool = _opt(False, "training", "keep the caption encodings on disk")
    text_encoder_batch_size: Optional[int] = _opt(None, "training", "captions per text-encoder batch when caching")
    max_data_loader_n_workers: int = _opt(8, "training", "data loader worker processes")
    persistent_data_loader_workers: bool = _opt(False, "training", "keep data loader workers between epochs")

    # dataset
    train_data_dir: Optional[str] = _opt(None, "dataset", "folder of N_name subfolders (N = repeats)")
    resolution: Optional[str] = _opt(None, "dataset", '"W,H" or "S" training resolution')
    caption_extension: str = _opt(".caption", "dataset", "caption file extension")
    keep_tokens: int = _opt(0, "dataset", "leading caption tags never shuffled")
    shuffle_caption: bool = _opt(False, "dataset", "shuffle comma-separated caption tags")
    caption_dropout_rate: float = _opt(0.0, "dataset", "probability of training on an empty caption")
    flip_aug: bool = _opt(False, "dataset", "random horizontal flips")
    color_aug: bool = _opt(False, "dataset", "random hue shifts")
    enable_bucket: bool = _opt(False, "dataset", "aspect-ratio buckets")
    min_bucket_reso: int = _opt(256, "dataset", "smallest bucket side")
    max_bucket_reso: int = _opt(1024, "dataset", "largest bucket side")
    bucket_reso_steps: int = _opt(64, "dataset", "bucket side granularity")
    bucket_no_upscale: bool = _opt(False, "dataset", "never upscale images to fill a bucket")
    cache_latents: bool = _opt(False, "dataset", "encode images with the VAE once")
    cache_latents_to_disk: bool = _opt(False, "dataset", "keep cached latents on disk for later runs")
    vae_batch_size: int = _opt(1, "dataset", "images per VAE batch when caching latents")

    # saving and sampling
    output_dir: Optional[str] = _opt(None, "saving", "where checkpoints, samples and state go")
    output_name: Optional[str] = _opt(None, "saving", "checkpoint file name stem")
    save_model_as: str = _opt("safetensors", "saving", "only safetensors")
    save_every_n_epochs: Optional[int] = _opt(None, "saving", "write a numbered checkpoint every n epochs")
    save_every_n_steps: Optional[int] = _opt(None, "saving", "write a numbered checkpoint every n optimizer steps")
    save_state: bool = _opt(False, "saving", "write a resumable training state with each checkpoint")
    sample_prompts: Optional[str] = _opt(None, "saving", "kohya prompt file for sample images")
    sample_every_n_epochs: Optional[int] = _opt(None, "saving", "sample images every n epochs")
    sample_every_n_steps: Optional[int] = _opt(None, "saving", "sample images every n optimizer steps")
    sample_sampler: str = _opt("ddim", "saving", "sampler for sample images")
    logging_dir: Optional[str] = _opt(None, "saving", "TensorBoard log folder (per-step loss and lr, per-epoch scores)")
    log_with: Optional[str] = _opt(None, "saving", "tensorboard, wandb or all; unset: tensorboard when logging_dir is set")
    log_prefix: Optional[str] = _opt(None, "saving", "sd-scripts: prefix of its timestamped log folder (kohya backend)")
    log_tracker_name: Optional[str] = _opt(None, "saving", "W&B project name (default lora-search)")
    wandb_run_name: Optional[str] = _opt(None, "saving", "W&B run name (default: the output_name)")
    training_comment: Optional[str] = _opt(None, "saving", "stored in the LoRA metadata")
    metadata_trigger_phrase: Optional[str] = _opt(None, "saving", "trigger words; replaces {trigger} in prompts")

    def __post_init__(self) -> None:
        for check in _VALUE_CHECKS:
            check(self)

    @property
    def effective_unet_lr(self) -> float:
        """The UNet's learning rate as sd-scripts applies it: ``unet_lr`` when set, else ``learning_rate``."""
        return self.unet_lr if self.unet_lr is not None else self.learning_rate

    def to_dict(self, include_defaults: bool = True) -> dict[str, Any]:
        """The config as flat kohya keys; ``None`` values are left out (TOML has no null).

        Keys only ``sd3_train_network.py`` knows, and lora-search's own (:data:`LORA_SEARCH_KEYS`), are left
        out at their default even with ``include_defaults``: ``train_network.py`` refuses them, and the
        default means the same.
        """
        out = {}
        sd3_only = kohya_sd3_argument_names() | LORA_SEARCH_KEYS
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if (not include_defaults or f.name in sd3_only) and value == _default_of(f):
                continue
            out[f.name] = value
        return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _bad(key: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"{key} = {value!r}: {fix}")


def _check_choices(cfg: TrainingConfig) -> None:
    lookup = {name.lower(): name for name in OPTIMIZERS}
    canonical = lookup.get(cfg.optimizer_type.lower())
    if canonical is None:
        raise _bad("optimizer_type", cfg.optimizer_type, "use one of " + ", ".join(OPTIMIZERS))
    cfg.optimizer_type = canonical
    if cfg.lr_scheduler not in SCHEDULERS:
        raise _bad("lr_scheduler", cfg.lr_scheduler, "use one of " + ", ".join(SCHEDULERS))
    if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps > 0:
        # sd-scripts' get_scheduler_fix raises for this ("CONSTANT does not require num_warmup_steps"),
        # and diffusers' constant would silently skip the warmup: refuse it rather than train something else.
        raise _bad("lr_scheduler", "constant", f"with lr_warmup_steps = {cfg.lr_warmup_steps} sd-scripts refuses it; "
                   'use lr_scheduler = "constant_with_warmup" or lr_warmup_steps = 0')
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise _bad("mixed_precision", cfg.mixed_precision, "use no, fp16 or bf16")
    if cfg.save_precision not in (None, "float", "fp16", "bf16"):
        raise _bad("save_precision", cfg.save_precision, "use float, fp16 or bf16")
    if cfg.network_module not in NETWORK_MODULES:
        raise _bad("network_module", cfg.network_module, "use " + " or ".join(NETWORK_MODULES))
    if cfg.weighting_scheme not in WEIGHTING_SCHEMES:
        raise _bad("weighting_scheme", cfg.weighting_scheme, "use one of " + ", ".join(WEIGHTING_SCHEMES))
    if cfg.save_model_as != "safetensors":
        raise _bad("save_model_as", cfg.save_model_as, 'only "safetensors" is written')
    if cfg.xformers:
        raise _bad("xformers", True, "xformers is not used; attention runs on PyTorch SDPA: set xformers = false")
    backend = str(cfg.dynamo_backend).lower()
    if backend not in DYNAMO_BACKENDS:
        raise _bad("dynamo_backend", cfg.dynamo_backend, "use one of " + ", ".join(DYNAMO_BACKENDS))
    cfg.dynamo_backend = backend
    if cfg.max_token_length not in (None, 75, 150, 225):
        raise _bad("max_token_length", cfg.max_token_length, "use 75, 150 or 225")
    _check_logging(cfg)


def _check_logging(cfg: TrainingConfig) -> None:
    if cfg.log_with is not None and cfg.log_with not in LOG_WITH:
        raise _bad("log_with", cfg.log_with, "use " + ", ".join(LOG_WITH))
    if cfg.log_with in ("tensorboard", "all") and not cfg.logging_dir:
        # sd-scripts refuses this too; a run must not look logged and leave nothing behind
        raise _bad("log_with", cfg.log_with, 'TensorBoard needs a folder: set logging_dir = "runs/my_lora/logs"')


def _check_numbers(cfg: TrainingConfig) -> None:
    positive_ints = ("network_dim", "max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                     "lr_scheduler_num_cycles", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                     "vae_batch_size")
    for key in positive_ints:
        if getattr(cfg, key) < 1:
            raise _bad(key, getattr(cfg, key), "must be at least 1")
    for key in ("max_train_epochs", "save_every_n_epochs", "sample_every_n_epochs", "save_every_n_steps",
                "sample_every_n_steps", "clip_skip", "text_encoder_batch_size", "t5xxl_max_token_length"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise _bad(key, value, "must be at least 1 (or left out)")
    for key in ("lr_warmup_steps", "keep_tokens", "max_data_loader_n_workers", "blocks_to_swap"):
        if (getattr(cfg, key) or 0) < 0:
            raise _bad(key, getattr(cfg, key), "must not be negative")
    for key in ("learning_rate", "unet_lr", "text_encoder_lr"):
        value = getattr(cfg, key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise _bad(key, value, "must be a finite number >= 0")
    for key in ("network_alpha", "max_grad_norm", "min_snr_gamma", "noise_offset", "lr_scheduler_power"):
        value = getattr(cfg, key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise _bad(key, value, "must be a finite number >= 0")
    for key in ("network_dropout", "caption_dropout_rate", "clip_l_dropout_rate", "clip_g_dropout_rate",
                "t5_dropout_rate", "pos_emb_random_crop_rate"):
        value = getattr(cfg, key)
        if value is not None and not 0 <= value < 1:
            raise _bad(key, value, "must be in [0, 1)")
    for key in ("training_shift", "logit_std"):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) > 0):
            raise _bad(key, getattr(cfg, key), "must be a number > 0")
    for key in ("logit_mean", "mode_scale"):
        if not math.isfinite(getattr(cfg, key)):
            raise _bad(key, getattr(cfg, key), "must be a finite number")
    if cfg.min_bucket_reso > cfg.max_bucket_reso:
        raise _bad("min_bucket_reso", cfg.min_bucket_reso, f"must not exceed max_bucket_reso ({cfg.max_bucket_reso})")
    if cfg.resolution is not None:
        parse_resolution(cfg.resolution)


def _check_key_value_lists(cfg: TrainingConfig) -> None:
    for key in ("optimizer_args", "network_args"):
        for item in getattr(cfg, key):
            if not isinstance(item, str) or "=" not in item:
                raise _bad(key, item, 'write each entry as "name=value"')


_VALUE_CHECKS = (_check_choices, _check_numbers, _check_key_value_lists)


def parse_resolution(value: str) -> tuple[int, int]:
    """``"512"`` or ``"512,768"`` (width, height) as kohya reads ``resolution``."""
    parts = [p.strip() for p in str(value).split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise _bad("resolution", value, 'write "512" or "512,768"') from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 64:
        raise _bad("resolution", value, 'write "512" or "512,768" (each side at least 64)')
    return sizes[0], sizes[1]


FIELDS = {f.name: f for f in dataclasses.fields(TrainingConfig)}
_HINTS = typing.get_type_hints(TrainingConfig)


def kohya_argument_names() -> frozenset[str]:
    """Every argument name sd-scripts' ``train_network.py`` accepts (read from its parser)."""
    return frozenset(_KOHYA_ARGS_FILE.read_text().split())


@functools.cache
def kohya_sd3_argument_names() -> frozenset[str]:
    """The argument names ``sd3_train_network.py`` accepts on top of :func:`kohya_argument_names`."""
    return frozenset(_KOHYA_SD3_ARGS_FILE.read_text().split())


def value_type(key: str) -> type:
    """The Python type of a config key's value (``Optional`` removed): bool, int, float, str or list."""
    hint = _HINTS[key]
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _coerce(key: str, value: Any) -> Any:
    hint = value_type(key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _bad(key, value, "write true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _bad(key, value, "write a whole number")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _bad(key, value, "write a number")
    if hint is str:
        if key == "resolution" and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            return value
        raise _bad(key, value, "write a quoted string")
    if hint is list:
        if isinstance(value, list):
            return value
        raise _bad(key, value, 'write a list, e.g. ["name=value"]')
    raise AssertionError(f"unhandled type for {key}: {hint}")


def unknown_key_error(key: str, where: str) -> ConfigError:
    """The error for a key that is not a :class:`TrainingConfig` field, with the nearest valid name."""
    if key in kohya_argument_names() | kohya_sd3_argument_names():
        return ConfigError(f"{where}: '{key}' is an sd-scripts option lora-search does not support; remove it")
    near = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"did you mean '{near[0]}'?" if near else "remove it"
    return ConfigError(f"{where}: unknown key '{key}'; {hint}")


def flatten_sections(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Merge ``[section]`` tables into one flat dict, as sd-scripts does; a key set twice is an error."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        items = value.items() if isinstance(value, dict) else [(name, value)]
        for key, item in items:
            if isinstance(item, dict):
                raise ConfigError(f"{where}: [{name}.{key}] nests too deep; kohya configs use one level of sections")
            if key in flat:
                raise ConfigError(f"{where}: '{key}' is set twice; keep one")
            flat[key] = item
    return flat


def config_from_dict(flat: dict[str, Any], where: str = "config") -> TrainingConfig:
    """Build a config from flat kohya keys, rejecting unknown keys and ill-typed values."""
    for key in flat:
        if key not in FIELDS:
            raise unknown_key_error(key, where)
    try:
        values = {key: _coerce(key, value) for key, value in flat.items()}
        return TrainingConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def read_toml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Parse a TOML file, turning a missing or malformed file into one clear :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} not found; check the path")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file; give a TOML config") from None


def load_training_config(path: str | Path) -> TrainingConfig:
    """Read a kohya-style training TOML strictly."""
    return config_from_dict(flatten_sections(read_toml(path, "training config"), str(path)), str(path))


def dumps_config(values: dict[str, Any], header: str = "") -> str:
    """Flat kohya keys as TOML grouped into the usual sections (keys not in the schema go last)."""
    groups: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        if value is None:
            continue
        section = FIELDS[key].metadata["section"] if key in FIELDS else "training"
        groups[section][key] = value
    body = tomli_w.dumps({name: items for name, items in groups.items() if items})
    return (header + "\n" if header else "") + body


def write_config(path: str | Path, values: dict[str, Any], header: str = "") -> Path:
    """Write a training TOML atomically."""
    return atomic_write_text(Path(path), dumps_config(values, header))
