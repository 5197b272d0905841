"""``lora-search demo``: the whole pipeline, end to end, in the toy world, on the CPU in about 2 minutes.

The toy world (``toyworld/``) has a small Stable Diffusion 1.x model pretrained on coloured shapes, a
toy CLIP trained on the same world, and a character the model has never seen: a pink star, called
``zkx`` in its kohya dataset. The demo copies that dataset next to its configs, writes a base config
pointed at the toy model and a search space scaled to CPU minutes, and runs a real short study with
one worker and a fixed sampler seed (so every run trains the same trials): the first guess trained as
the baseline, a deliberately unsafe trial rejected by the constraints, trials sampled by the shipped
sampler and pruner and trained by the built-in trainer, every epoch sampled and scored by the CLIP
evaluator, export of the best trial. Its last lines say which trial learned the character and by how much.

``--model sd3`` runs the same study on the toy world's SD3 model (``toyworld/assets/sd3/``, an MMDiT
trained with rectified flow): the shipped DiT base config (``configs/dit/base.toml``) and a DiT search
space, trained by the built-in trainer's SD3 path.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
import tomli_w

import toyworld
from search.settings import load_settings
from search.study import open_study
from toyworld import world

TRIGGER = world.TRIGGER
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Validation prompts: the character against backgrounds and positions of the world, one seed each.
PROMPTS = (("grass", "left"), ("snow", "right"), ("sky", "top"), ("wood", "center"))
# The first guess, trained as the study's baseline: the shipped base config's recipe (rank 8, alpha
# half the rank, 1e-4, cosine, 100 warmup steps, effective batch 2) scaled down to four CPU epochs.
FIRST_GUESS = {"network_dim": 8, "network_alpha": 4, "network_dropout": 0.0, "learning_rate": 1e-4, "unet_lr": 1e-4,
               "text_encoder_lr": 5e-5, "lr_scheduler": "cosine", "lr_warmup_steps": 100, "max_train_epochs": 4,
               "gradient_accumulation_steps": 2, "optimizer_type": "AdamW", "min_snr_gamma": 5.0}
# The SD3 toy model's first guess: configs/dit/base.toml's recipe (lr 1e-4, cosine, effective batch 2,
# 32-bit AdamW) at rank 16, alpha 8 for eight CPU epochs.
FIRST_GUESS_SD3 = {"network_dim": 16, "network_alpha": 8, "network_dropout": 0.0, "learning_rate": 1e-4,
                   "unet_lr": 1e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 100, "max_train_epochs": 8,
                   "gradient_accumulation_steps": 2, "optimizer_type": "AdamW", "weighting_scheme": "uniform"}
# The first guess as the demo space's params (for enqueueing it, as tests do).
SAFE_PARAMS = {"network_dim": 8, "network_alpha_ratio": 0.5, "learning_rate": 1e-4, "text_encoder_lr": 5e-5,
               "lr_scheduler": "cosine", "max_train_epochs": 4, "lr_warmup_steps": 100}
# A trial the demo enqueues after the baseline: rank 256 for a few epochs, which constraint 3 refuses.
UNSAFE_PARAMS = {**SAFE_PARAMS, "network_dim": 256}
# The demo's search space, scaled to CPU minutes. The toy LoRA trains 240-360 optimizer steps where a
# real one trains thousands, so the rates that learn sit higher than for SD 1.5 (measured: 1e-4 leaves
# the base model as it was, 1e-3 to 1e-2 draws the character): the range spans both.
DEMO_SPACE = {
    "network_dim": {"choices": [8, 16, 256]},  # 256 for 4-6 epochs is refused (constraint 3)
    "network_alpha_ratio": {"low": 0.25, "high": 0.7, "step": 0.05},
    "network_dropout": {"value": 0.0},
    "learning_rate": {"low": 1e-4, "high": 3e-2, "log": True},
    "text_encoder_lr": {"low": 1e-5, "high": 1e-2, "log": True},
    "lr_scheduler": {"choices": ["cosine", "constant_with_warmup"]},
    "max_train_epochs": {"choices": [4, 6]},
    "min_snr_gamma": {"value": 5},
    "optimizer_type": {"value": "AdamW"},  # 8-bit AdamW needs a CUDA GPU
    "gradient_accumulation_steps": {"value": 2},
    "lr_warmup_steps": {"choices": [50, 100]},  # 50 with a rate over 1e-4 is refused (constraint 4)
}


@dataclass
class DemoPaths:
    root: Path

    @property
    def train(self) -> Path:
        return self.root / "data" / "train"

    @property
    def references(self) -> Path:
        return self.root / "data" / "references"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def study_config(self) -> Path:
        return self.configs / "study.toml"

    @property
    def export(self) -> Path:
        return self.root / "best.toml"


# The SD3 demo's space: as DEMO_SPACE without the UNet's options (text_encoder_lr, min_snr_gamma), with the
# flow-matching timestep sampling searched. Measured on the SD3 toy model (tests/test_toyworld_dit.py):
# 3e-3 draws the character within 8 epochs, 3e-5 leaves the base model as it was.
DEMO_SPACE_SD3 = {
    "network_dim": {"choices": [8, 16, 256]},  # 256 for 6-8 epochs is refused (constraint 3)
    "network_alpha_ratio": {"low": 0.25, "high": 0.7, "step": 0.05},
    "network_dropout": {"value": 0.0},
    "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
    "lr_scheduler": {"choices": ["cosine", "constant_with_warmup"]},
    "max_train_epochs": {"choices": [6, 8]},
    "optimizer_type": {"value": "AdamW"},
    "gradient_accumulation_steps": {"value": 2},
    "lr_warmup_steps": {"choices": [50, 100]},
    "weighting_scheme": {"choices": ["uniform", "logit_normal"]},
}
SAFE_PARAMS_SD3 = {"network_dim": 16, "network_alpha_ratio": 0.5, "learning_rate": 1e-4, "lr_scheduler": "cosine",
                   "max_train_epochs": 8, "lr_warmup_steps": 100, "weighting_scheme": "uniform"}


def write_prompts(path: Path, steps: int = 16, scale: float = 5.0) -> None:
    """kohya-syntax prompts: the trigger word, a background and a position, one fixed seed each."""
    lines = [f"{{trigger}}, {bg} background, {pos} --w {world.SIZE} --h {world.SIZE} --d {i + 1} --s {steps} "
             f"--l {scale}" for i, (bg, pos) in enumerate(PROMPTS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# the toy world's validation prompts\n" + "\n".join(lines) + "\n", encoding="utf-8")


def toy_sd3_base_config(paths: DemoPaths) -> dict:
    """configs/dit/base.toml pointed at the SD3 toy model and the copied dataset, shrunk to CPU size
    (float32, no fp8, no gradient checkpointing, 64 px, the toy T5's 8 tokens), with the first guess."""
    from toyworld.build_dit import T5_TOKENS

    base = tomllib.loads((REPO_CONFIGS / "dit" / "base.toml").read_text())
    base["model"].update(pretrained_model_name_or_path=str(toyworld.SD3), fp8_base=False,
                         t5xxl_max_token_length=T5_TOKENS)
    base["dataset"].update(train_data_dir=str(paths.train), resolution=f"{world.SIZE},{world.SIZE}",
                           enable_bucket=False, cache_latents=True, cache_latents_to_disk=True)
    base["training"].update(train_batch_size=1, mixed_precision="no", gradient_checkpointing=False,
                            max_data_loader_n_workers=0, save_precision="float")
    base["saving"].update(output_dir=str(paths.root / "train"), output_name="toy", save_every_n_epochs=1,
                          sample_every_n_epochs=1, sample_prompts=str(paths.configs / "prompts.txt"),
                          metadata_trigger_phrase=TRIGGER)
    for key, value in FIRST_GUESS_SD3.items():
        section = next((sec for sec in base.values() if key in sec), base["training"])
        section[key] = value
    return base


def toy_base_config(paths: DemoPaths, **overrides: object) -> dict:
    """The shipped base config pointed at the toy model and the copied dataset, shrunk to CPU size, with
    the first guess's values and then ``overrides`` (kohya keys) in the sections base.toml keeps them in."""
    base = tomllib.loads((REPO_CONFIGS / "base.toml").read_text())
    base["model"]["pretrained_model_name_or_path"] = str(toyworld.MODEL)
    base["dataset"].update(train_data_dir=str(paths.train), resolution=f"{world.SIZE},{world.SIZE}",
                           enable_bucket=False, cache_latents=True, cache_latents_to_disk=True)
    base["training"].update(train_batch_size=1, mixed_precision="no", max_data_loader_n_workers=0)
    base["optimizer"].pop("lr_scheduler_num_cycles", None)
    base["saving"].update(output_dir=str(paths.root / "train"), output_name="toy", save_every_n_epochs=1,
                          sample_every_n_epochs=1, sample_prompts=str(paths.configs / "prompts.txt"),
                          metadata_trigger_phrase=TRIGGER, sample_sampler="euler")
    for key, value in {**FIRST_GUESS, **overrides}.items():
        section = next((sec for sec in base.values() if key in sec), base["training"])
        section[key] = value
    return base


def toy_evaluator_config(paths: DemoPaths) -> dict:
    """The shipped evaluator settings pointed at the toy CLIP and the character's references, with the
    bounds measured for the toy CLIP (``toyworld/assets/calibration.json``) in place of ViT-L/14's."""
    evaluator = tomllib.loads((REPO_CONFIGS / "evaluator.toml").read_text())
    evaluator["references"] = str(paths.references)
    evaluator["clip"].update(model=f"local-dir:{toyworld.CLIP}", pretrained="", device="cpu")
    for section, bounds in json.loads(toyworld.CALIBRATION.read_text(encoding="utf-8")).items():
        evaluator[section].update(bounds)
    return evaluator


def copy_dataset(paths: DemoPaths) -> None:
    """The character's kohya dataset and references, copied so the demo folder is self-contained."""
    for source, target in ((toyworld.TRAIN, paths.train), (toyworld.REFERENCES, paths.references)):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)


def write_configs(paths: DemoPaths, n_trials: int, model: str = "sd1") -> None:
    configs = paths.configs
    configs.mkdir(parents=True, exist_ok=True)
    write_prompts(configs / "prompts.txt")
    base, space = (toy_sd3_base_config(paths), DEMO_SPACE_SD3) if model == "sd3" else (toy_base_config(paths), DEMO_SPACE)
    (configs / "base.toml").write_text(f"# lora-search demo: the toy world ({model}), CPU\n" + tomli_w.dumps(base))
    (configs / "search_space.toml").write_text("# lora-search demo: scaled to CPU minutes\n" + tomli_w.dumps(space))
    (configs / "evaluator.toml").write_text(tomli_w.dumps(toy_evaluator_config(paths)))
    study = {
        "study": {"name": "demo", "n_trials": n_trials, "runs_dir": str(paths.root), "seed": 1,
                  "base_config": str(configs / "base.toml"), "search_space": str(configs / "search_space.toml"),
                  "evaluator_config": str(configs / "evaluator.toml"), "baseline_config": str(configs / "base.toml")},
        "backend": {"type": "builtin"},
        "scorer": {"type": "clip"},
    }
    if model == "sd3":  # the VRAM estimate is for SD3.5 Large in float32; the toy transformer has 1 MB
        study["study"]["gpu_memory_gb"] = 80
    paths.study_config.write_text("# lora-search demo study\n" + tomli_w.dumps(study))


def prepare(root: Path, n_trials: int, say: Callable[[str], None], model: str = "sd1") -> DemoPaths:
    """Copy the toy world's dataset and write the demo configs (the models are read where they are)."""
    toyworld.require_assets()
    paths = DemoPaths(root)
    say(f"toy world: model {toyworld.SD3 if model == 'sd3' else toyworld.MODEL}, CLIP {toyworld.CLIP}")
    say(f"copying the character's dataset (a pink star, trigger '{TRIGGER}') to {paths.train}")
    copy_dataset(paths)
    write_configs(paths, n_trials, model)
    return paths


def run_demo(root: Path, n_trials: int = 4, say: Callable[[str], None] = print, model: str = "sd1") -> DemoPaths:
    """Prepare, run the study in the foreground, export the best trial, say what was learned (``model``:
    ``sd1`` the SD 1.x toy model, ``sd3`` the SD3 one)."""
    from search.export import export_trial
    from search.status import status_text
    from search.worker import Worker

    paths = prepare(root, n_trials, say, model)
    settings = load_settings(paths.study_config)
    shipped = "configs/dit/base.toml" if model == "sd3" else "configs/base.toml"
    say(f"running study 'demo': {n_trials} trained trials on the CPU, the first guess ({shipped}) first")
    worker = Worker(settings, study=open_study(settings, seed_offset=0))  # one worker: the same trials every run
    if all(t.user_attrs.get("baseline") for t in worker.study.trials):
        unsafe = {**SAFE_PARAMS_SD3, "network_dim": 256} if model == "sd3" else UNSAFE_PARAMS
        worker.study.enqueue_trial(unsafe)  # shows a constraint rejection
    worker.run()
    say(status_text(worker.study, n_trials))
    export_trial(worker.study, worker.base, paths.export)
    for line in outcome_lines(worker.study):
        say(line)
    return paths


# --- what the study learned ---------------------------------------------------------------------------


@dataclass
class TrialOutcome:
    """One trained trial's epochs as the evaluator scored them."""

    number: int
    params: dict
    components: dict[int, dict[str, float]]  # epoch -> component scores
    totals: dict[int, float]  # epoch -> total score

    @property
    def first(self) -> int:
        return min(self.components)

    @property
    def best(self) -> int:
        return max(self.totals, key=lambda e: (self.totals[e], -e))

    @property
    def identity_gain(self) -> float:
        return self.components[self.best]["identity"] - self.components[self.first]["identity"]


def trial_outcomes(study: optuna.Study) -> list[TrialOutcome]:
    """Every trial with scored epochs, from the per-epoch components the worker stores on it."""
    outcomes = []
    for trial in study.get_trials(deepcopy=False):
        comps = {int(k[len("components_e"):]): v for k, v in trial.user_attrs.items() if k.startswith("components_e")}
        totals = {int(e): float(v) for e, v in trial.intermediate_values.items()}
        comps = {e: c for e, c in comps.items() if e in totals}
        if comps:
            outcomes.append(TrialOutcome(trial.number, dict(trial.params), comps, totals))
    return outcomes


def _describe(o: TrialOutcome, epoch: int) -> str:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in o.components[epoch].items())
    return f"epoch {epoch}: total {o.totals[epoch]:.3f} ({parts})"


def outcome_lines(study: optuna.Study) -> list[str]:
    """The demo's closing lines: which trial learned the character, by how much, and which did not."""
    outcomes = trial_outcomes(study)
    if not outcomes:
        return ["no trial finished an epoch, so nothing was learned"]
    learner = max(outcomes, key=lambda o: o.identity_gain)
    laggard = min(outcomes, key=lambda o: o.identity_gain)
    lines = ["", f"trial {learner.number} (learning_rate {learner.params.get('learning_rate', 0):.1e}) learned the "
             f"character most: identity {learner.components[learner.first]['identity']:.2f} -> "
             f"{learner.components[learner.best]['identity']:.2f} ({learner.identity_gain:+.2f}) from epoch "
             f"{learner.first} to its best epoch {learner.best}",
             f"  {_describe(learner, learner.first)}", f"  {_describe(learner, learner.best)}"]
    if laggard.number != learner.number:
        lines.append(f"trial {laggard.number} (learning_rate {laggard.params.get('learning_rate', 0):.1e}) learned "
                     f"least: identity {laggard.components[laggard.first]['identity']:.2f} -> "
                     f"{laggard.components[laggard.best]['identity']:.2f} ({laggard.identity_gain:+.2f})")
    return lines
