"""Pre-flight: everything a study will need, checked before anything is started, created or detached.

``lora-search start`` (and ``worker``, and ``check --study`` for a check alone) runs :func:`preflight`
first. It reads every config the study uses and each thing they point at, in the order a trial would
meet them, and stops at the first problem with one line naming it and the fix. It writes nothing: no
study, no folder, no session.

Checked: study.toml (already parsed by the caller), the search space, the base config with its preset,
a first trial config built from a sampled point (unknown keys, wrong types, refused options such as
``xformers``), the baseline config, the model (a readable SD 1.x/SDXL file or diffusers folder), the
dataset (``N_name`` folders, every image decoded), the sample prompt file, the scorer (the evaluator
settings, the CLIP model loaded offline and the reference images encoded; or the command's program),
the kohya backend's program, the storage (reachable; a local file's folder writable with space left)
and tmux when a session will be started.

:func:`check_inputs` is the cheap part a worker repeats before every trial: when the model or dataset
vanishes mid-study it stops with that line instead of failing trial after trial.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from search.errors import ConfigError, StorageError
from search.settings import StudySettings
from training.config import TrainingConfig, config_from_dict
from training.errors import LoraSearchError

# Less free space than this under a SQLite or journal file is refused before the study starts.
MIN_FREE_BYTES = 64 * 1024 * 1024
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
FIX_MODEL = "set pretrained_model_name_or_path in the base config"


def preflight(settings: StudySettings, tmux: bool = False, load_clip: bool = True,
              say: Callable[[str], None] = lambda line: None) -> TrainingConfig:
    """Check the whole study set-up; ``say`` gets one line per part checked. Returns the first trial's
    config. Raises the first problem as a :class:`LoraSearchError`."""
    from search.space import load_search_space
    from search.trial_config import load_base_values

    space = load_search_space(settings.study.search_space)
    base = load_base_values(settings.study.base_config, settings.study.preset)
    say(f"configs: {settings.study.base_config}, {settings.study.search_space} ({len(space.distributions)} "
        "searched parameters)")
    cfg = first_trial_config(settings, space, base)
    from training.families import check_family_config

    check_family_config(cfg, "SD 1.x/SDXL", builtin=settings.backend.type == "builtin")
    say("a first trial config builds and is valid")
    if settings.study.baseline_config:
        check_baseline(settings, space, base)
        say(f"baseline: {settings.study.baseline_config}")
    say(check_model(cfg))
    say(check_dataset(cfg))
    if cfg.sample_prompts:
        say(check_prompts(cfg))
    say(check_scorer(settings, cfg, load_clip))
    if settings.backend.type == "kohya":
        say(check_program(settings.backend.command, "[backend] command"))
    say(check_storage(settings))
    if tmux:
        from search.tmux import require_tmux

        say(f"tmux: {require_tmux()}")
    return cfg


def check_inputs(cfg: TrainingConfig) -> None:
    """What a running study needs to exist for every trial (no image is decoded: this runs often)."""
    from training.data import scan_dataset

    model = Path(cfg.pretrained_model_name_or_path or "").expanduser()
    if not cfg.pretrained_model_name_or_path or not model.exists():
        raise ConfigError(f"model {cfg.pretrained_model_name_or_path} is gone; put it back or {FIX_MODEL}, "
                          "then lora-search resume")
    scan_dataset(cfg.train_data_dir, cfg.caption_extension)
    if cfg.sample_prompts and not Path(cfg.sample_prompts).is_file():
        raise ConfigError(f"sample_prompts {cfg.sample_prompts} is gone; put it back, then lora-search resume")


def first_trial_config(settings: StudySettings, space: Any, base: dict[str, Any]) -> TrainingConfig:
    """The config of a trial sampled from the space (in memory), validated as the worker would."""
    import optuna

    from search.trial_config import trial_values

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "new study created in memory" line
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=settings.study.seed))
    finally:
        optuna.logging.set_verbosity(verbosity)
    params = space.suggest(study.ask())
    values = trial_values(base, params, settings.study_dir / "trial_0000")
    return config_from_dict(values, f"{settings.study.base_config} with a sampled trial's params")


def check_baseline(settings: StudySettings, space: Any, base: dict[str, Any]) -> None:
    """The baseline config loads, lies in the space, passes the constraints and fits the VRAM budget."""
    from search.baseline import load_baseline

    load_baseline(settings.study.baseline_config, space, base, settings.study.search_space,
                  settings.study.gpu_memory_gb, settings.study_dir)


def check_model(cfg: TrainingConfig) -> str:
    """The model is a readable SD 1.x/SDXL checkpoint file or diffusers folder (weights are not loaded)."""
    from training.models import CHECKPOINT_SUFFIXES, detect_checkpoint_kind

    source = cfg.pretrained_model_name_or_path
    if not source:
        raise ConfigError(f"pretrained_model_name_or_path is not set; {FIX_MODEL}")
    path = Path(source).expanduser()
    if path.is_dir():
        return f"model: {path} ({_check_model_folder(path)})"
    if not path.is_file():
        raise ConfigError(f"model {source} not found; {FIX_MODEL} to a .safetensors file or a diffusers folder")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError(f"model {source} is not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) "
                          f"or a diffusers folder; {FIX_MODEL}")
    kind = detect_checkpoint_kind(path)
    if kind == "sd2":
        raise ConfigError(f"model {source} is Stable Diffusion 2.x, which lora-search does not train; "
                          "use an SD 1.x or SDXL model")
    return f"model: {path} ({kind})"


def _check_model_folder(path: Path) -> str:
    index = path / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"model folder {path} has no model_index.json; give a diffusers model folder "
                          "or a .safetensors file")
    try:
        layout = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{index} cannot be read ({exc}); re-download or re-save the model") from None
    kind = layout.get("_class_name", "")
    if kind not in SUPPORTED_PIPELINES:
        raise ConfigError(f"model folder {path} holds a {kind or 'pipeline without _class_name'}; lora-search "
                          f"trains {' and '.join(SUPPORTED_PIPELINES)} folders")
    for part in ("unet", "vae", "text_encoder", "tokenizer") + (("text_encoder_2",) if "XL" in kind else ()):
        if not (path / part).is_dir():
            raise ConfigError(f"model folder {path} has no {part}/ folder; re-download or re-save the model")
    _check_weights(path / "unet")
    return kind


def _check_weights(folder: Path) -> None:
    """The folder's .safetensors weights have readable headers (a truncated download does not)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise ConfigError(f"{folder} has no weights file; re-download or re-save the model")
    for file in (f for f in files if f.suffix == ".safetensors"):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises several types for a damaged header
            raise ConfigError(f"{file} cannot be read ({exc}); re-download or re-save the model") from None


def check_dataset(cfg: TrainingConfig) -> str:
    """``train_data_dir`` has ``N_name`` folders with images, and every image decodes."""
    from training.data import decode_image, scan_dataset

    items = scan_dataset(cfg.train_data_dir, cfg.caption_extension)
    for item in items:
        decode_image(item.path)
    captioned = sum(not item.caption_missing for item in items)
    return f"dataset: {len(items)} images in {cfg.train_data_dir}, {captioned} with captions, all readable"


def check_prompts(cfg: TrainingConfig) -> str:
    from training.prompts import load_prompt_file

    prompts = load_prompt_file(cfg.sample_prompts, cfg.metadata_trigger_phrase)
    return f"sample prompts: {len(prompts)} in {cfg.sample_prompts}"


def check_scorer(settings: StudySettings, cfg: TrainingConfig, load_clip: bool) -> str:
    if settings.scorer.type == "command":
        return check_program(settings.scorer.command, "[scorer] command")
    from evaluation import Evaluator, load_settings

    if not cfg.sample_prompts:
        raise ConfigError(f"{settings.study.base_config} has no sample_prompts; the CLIP scorer scores sample "
                          "images: set sample_prompts (e.g. prompts/character.txt) and sample_every_n_epochs")
    evaluator = Evaluator(load_settings(settings.study.evaluator_config))
    if not load_clip:
        return f"evaluator: {settings.study.evaluator_config}"
    references = evaluator.reference_embeddings()
    return (f"evaluator: {settings.study.evaluator_config}, CLIP {evaluator.settings.clip.model} loaded, "
            f"{len(references)} reference images")


def check_program(command: list[str], what: str) -> str:
    program = command[0] if command else ""
    if not program or (shutil.which(program) is None and not Path(program).is_file()):
        raise ConfigError(f"{what}: program {program!r} not found; fix the command line in study.toml")
    return f"{what}: {program}"


def check_storage(settings: StudySettings) -> str:
    """The storage opens (a server answers) or, for a local file, its folder can be written."""
    from search.study import open_storage, redact, storage_file, storage_url

    url = storage_url(settings)
    path = storage_file(url)
    if path is None:
        open_storage(url, settings)
        return f"storage: {redact(url)} reachable"
    folder = _existing_folder(path.resolve())
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write in {folder} (for {path}); make it writable, or put the study elsewhere "
                           "with [study] runs_dir or --storage")
    if shutil.disk_usage(folder).free < MIN_FREE_BYTES:
        raise StorageError(f"no space left on the disk of {path} (under {MIN_FREE_BYTES >> 20} MiB free); "
                           "free some space, or put the study elsewhere with [study] runs_dir or --storage")
    return f"storage: {redact(url)}"


def _existing_folder(path: Path) -> Path:
    for candidate in path.parents:
        if candidate.exists():
            return candidate
    return Path("/")


def preflight_or_raise(settings: StudySettings, **kwargs: Any) -> Optional[TrainingConfig]:
    """:func:`preflight`, with any unexpected error also reported as one line (never a traceback)."""
    try:
        return preflight(settings, **kwargs)
    except LoraSearchError:
        raise
    except Exception as exc:
        raise LoraSearchError(f"pre-flight check failed: {type(exc).__name__}: {exc}") from exc
