"""Pre-flight: everything a study will need, checked before anything is started, created or detached.

``lora-search start`` (and ``worker``, and ``check --study`` for a check alone) runs :func:`preflight`
first. It reads every config the study uses and each thing they point at, in the order a trial would
meet them, and stops at the first problem with one line naming it and the fix. It writes nothing: no
study, no folder, no session.

Checked: study.toml (already parsed by the caller), the search space, the base config with its preset,
a first trial config built from a sampled point (unknown keys, wrong types, refused options such as
``xformers``), the model: its family (SD 1.x, SDXL, SD3/SD3.5, Z-Image) read from the diffusers folder's
``model_index.json`` or the file's tensor names, the folders its pipeline needs and readable weights, the
config's keys for that family and trainer (:func:`training.families.check_family_config`), the form the
trainer reads (the built-in trainer: SD3/Z-Image as diffusers folders; sd-scripts' ``sd3_train_network.py``:
a single .safetensors file holding, or given, its text encoders and VAE) and, with the kohya backend, that
the command runs the family's sd-scripts script; then the baseline config, the dataset (``N_name``
folders, every image decoded), the sample prompt file, the scorer (the evaluator settings, the CLIP model
loaded offline and the reference images encoded; or the command's program), the kohya backend's
program, the storage (reachable; a local file's folder writable with space left) and tmux when a session
will be started.

:func:`check_inputs` is the cheap part a worker repeats before every trial: when the model or dataset
vanishes mid-study it stops with that line instead of failing trial after trial.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from search.errors import ConfigError, StorageError
from search.settings import StudySettings
from training.config import TrainingConfig, config_from_dict
from training.errors import LoraSearchError
from training.families import DIT_FAMILIES, LABELS as FAMILY_NAMES, VRAM_ARCH

# Less free space than this under a SQLite or journal file is refused before the study starts.
MIN_FREE_BYTES = 64 * 1024 * 1024
FIX_MODEL = "set pretrained_model_name_or_path in the base config"
# The folders a diffusers pipeline of each family needs; the first holds the weights that are checked.
MODEL_PARTS = {
    "sd1": ("unet", "vae", "text_encoder", "tokenizer"),
    "sdxl": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2"),
    "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
            "tokenizer_3"),
    "zimage": ("transformer", "vae", "text_encoder", "tokenizer"),
}
# The sd-scripts script that trains each family (Z-Image is not in sd-scripts).
KOHYA_SCRIPTS = {"sd1": "train_network.py", "sdxl": "sdxl_train_network.py", "sd3": "sd3_train_network.py"}


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

    family, model_line = check_model(cfg)
    check_family_config(cfg, family, builtin=settings.backend.type == "builtin")
    check_model_for_backend(cfg, family, settings)
    say("a first trial config builds and is valid")
    if settings.study.baseline_config:
        check_baseline(settings, space, base)
        say(f"baseline: {settings.study.baseline_config}")
    say(model_line)
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


def check_model(cfg: TrainingConfig) -> tuple[str, str]:
    """The model is a readable checkpoint file or diffusers folder of a family lora-search trains (weights
    are not loaded). Returns the family (``"sd1"``, ``"sdxl"``, ``"sd3"``, ``"zimage"``) and the line to show."""
    from training.models import CHECKPOINT_SUFFIXES, checkpoint_family

    source = cfg.pretrained_model_name_or_path
    if not source:
        raise ConfigError(f"pretrained_model_name_or_path is not set; {FIX_MODEL}")
    path = Path(source).expanduser()
    if path.is_dir():
        family = _check_model_folder(path)
        return family, f"model: {path} ({FAMILY_NAMES[family]} diffusers folder)"
    if not path.is_file():
        raise ConfigError(f"model {source} not found; {FIX_MODEL} to a .safetensors file or a diffusers folder")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError(f"model {source} is not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) "
                          f"or a diffusers folder; {FIX_MODEL}")
    family = checkpoint_family(path)
    if family == "sd2":
        raise ConfigError(f"model {source} is Stable Diffusion 2.x, which lora-search does not train; "
                          "use an SD 1.x, SDXL, SD3/SD3.5 or Z-Image model")
    return family, f"model: {path} ({FAMILY_NAMES[family]} single file)"


def check_model_for_backend(cfg: TrainingConfig, family: str, settings: StudySettings) -> None:
    """The model's form suits the trainer: the built-in trainer reads SD3/Z-Image from diffusers folders;
    sd-scripts' sd3_train_network.py reads a single .safetensors file (and the text encoder files it is given)
    and the command must run the sd-scripts script of the model's family."""
    source = cfg.pretrained_model_name_or_path
    is_folder = Path(source).expanduser().is_dir()
    if settings.backend.type == "builtin":
        if family in DIT_FAMILIES and not is_folder:
            raise ConfigError(f"model {source} is {_a(family)} single file; the built-in trainer reads "
                              f"{FAMILY_NAMES[family]} from a diffusers folder: {FIX_MODEL} to one"
                              + (", or use the kohya backend (sd3_train_network.py)" if family == "sd3" else ""))
        return
    check_kohya_command(settings.backend.command, family)
    if family == "sd3":
        if is_folder or Path(source).suffix != ".safetensors":
            raise ConfigError(f"model {source}: sd3_train_network.py reads a single .safetensors checkpoint, not a "
                              f"diffusers folder; {FIX_MODEL} to the .safetensors file, or use the built-in backend")
        _check_sd3_parts(cfg, Path(source).expanduser())


# sd-scripts' SD3 loaders (library/sd3_utils.py) take a part from the checkpoint when its option is unset,
# if the checkpoint holds this tensor (or, for the VAE, any tensor under this prefix).
SD3_FILE_PARTS = {
    "clip_l": ("CLIP-L", "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight"),
    "clip_g": ("CLIP-G", "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight"),
    "t5xxl": ("T5-XXL", "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.weight"),
    "vae": ("VAE", "first_stage_model."),
}


def _check_sd3_parts(cfg: TrainingConfig, checkpoint: Path) -> None:
    """Each text encoder and the VAE comes from its own file (clip_l, clip_g, t5xxl, vae) or from the
    checkpoint; sd3_train_network.py stops with a traceback on a part it finds in neither."""
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as handle:  # its header was read by check_model
        keys = list(handle.keys())
    for key, (part, marker) in SD3_FILE_PARTS.items():
        value = getattr(cfg, key)
        if value:
            if not Path(value).expanduser().is_file():
                raise ConfigError(f"{key} {value} not found; set {key} in the base config to the {part} file")
        elif not any(name.startswith(marker) for name in keys):
            raise ConfigError(f"model {checkpoint} holds no {part} and {key} is not set; set {key} in the base "
                              f"config to the {part} .safetensors file (sd3_train_network.py needs it)")


def check_kohya_command(command: list[str], family: str) -> None:
    """``[backend] command`` runs the sd-scripts script that trains ``family`` (SD3 needs
    sd3_train_network.py; SD 1.x/SDXL need train_network.py/sdxl_train_network.py, or a wrapper)."""
    wanted = KOHYA_SCRIPTS.get(family)
    if wanted is None:
        return
    named = [Path(part).name for part in command if Path(part).name in KOHYA_SCRIPTS.values()]
    wrong = [script for script in named if script != wanted]
    if wrong:
        raise ConfigError(f"[backend] command runs {wrong[0]}, which does not train {FAMILY_NAMES[family]} models; "
                          f"run {wanted} in the command line in study.toml")
    if family == "sd3" and not named:
        raise ConfigError("[backend] command does not run sd3_train_network.py, which trains SD3 models; "
                          "put it in the command line in study.toml (accelerate launch sd3_train_network.py "
                          "--config_file {config})")


def _a(family: str) -> str:
    """The family's name with its article: "an SD3/SD3.5", "a Z-Image"."""
    name = FAMILY_NAMES[family]
    return f"{'an' if name.startswith('S') else 'a'} {name}"


def describe_model(source: Optional[str]) -> str:
    """One line naming the model's family for ``check`` and ``plan``, read from the folder's model_index.json
    or the file's tensor names without loading anything (no torch)."""
    from training.families import detect_family
    from training.vram import file_arch

    if not source:
        return "model: not set (pretrained_model_name_or_path)"
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            return f"model: {source} ({FAMILY_NAMES[detect_family(path)]} diffusers folder)"
        except LoraSearchError as exc:
            return f"model: {source} (family unknown: {exc})"
    arch = file_arch(str(path)) if path.is_file() else None
    if arch is None:
        why = "not found" if not path.exists() else "not read from this file"
        return f"model: {source} (family unknown: {why})"
    family = next(name for name, vram_arch in VRAM_ARCH.items() if vram_arch == arch)
    return f"model: {source} ({FAMILY_NAMES[family]} single file)"


def _check_model_folder(path: Path) -> str:
    from training.families import detect_family

    index = path / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"model folder {path} has no model_index.json; give a diffusers model folder "
                          "or a .safetensors file")
    family = detect_family(path)
    for part in MODEL_PARTS[family]:
        if not (path / part).is_dir() and not _left_out(index, part):
            raise ConfigError(f"model folder {path} has no {part}/ folder, which {_a(family)} model "
                              "needs; re-download or re-save the model")
    _check_weights(path / MODEL_PARTS[family][0])
    return family


def _left_out(index: Path, part: str) -> bool:
    """The folder's ``model_index.json`` lists ``part`` as absent (``[null, null]``): SD3 without T5-XXL."""
    import json

    try:
        entry = json.loads(index.read_text(encoding="utf-8")).get(part)
    except (OSError, ValueError):
        return False
    return part in ("text_encoder_3", "tokenizer_3") and isinstance(entry, list) and not any(entry)


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
