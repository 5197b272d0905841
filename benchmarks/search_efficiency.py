"""How good a pick each sampler x pruner gets for its GPU-hours, on a synthetic LoRA-quality landscape.

The project's own ``Worker`` runs every search: the default search space, the seven constraints, the
VRAM check, the budget, the sampler and pruner as ``configs/study.toml`` would build them, trial
configs, notes and export's choice of the best trial. Only the trainer backend and the scorer are
replaced by :class:`SyntheticLoRA`, in-process, and the study lives in memory.

The landscape (written down so it can be argued with; it is not fitted to any method):

* A config trains ``E = max_train_epochs`` epochs of ``S = ceil(IMAGES / (batch * accum))`` optimizer
  steps each (IMAGES = 413, the user's dataset; batch 4 from base.toml). Step ``t`` of ``T = E * S``
  runs at ``lr * m(t)``: ``m`` is the schedule (linear warmup over ``lr_warmup_steps``, then cosine,
  cosine_with_restarts with base.toml's 2 cycles, linear, or constant).
* Learning progress after epoch e: ``P(e) = (lr / 8e-5) * (ratio / 0.5) * sum_{t <= e*S} m(t) / 470``
  (Adam steps have a fixed size, so progress counts steps, scaled by the LoRA scale alpha/dim; 470
  full-rate steps at lr 8e-5, ratio 0.5 is "learned enough"). More accumulation means fewer steps.
* Instability ``I = (lr / 1e-4) * (ratio / 0.5) * sqrt(2 / accum) * (1.15 for AdamW8bit)``: the
  best learning rate moves down as alpha/dim rises and up with the effective batch. A run with
  ``I * (1 + 0.3 * max(0, 100 - warmup) / 100) > 2.2`` explodes: from 30% of its epochs on it scores
  0.30 (the regions constraints 1 and 4-7 point at).
* Quality of epoch e, noise-free::

      0.50 + 0.26 * (1 - exp(-2.5 P))                        learning the character
           - 0.10 * sqrt(dim / 128) * (1 - 1.5 dropout) * max(0, P - 1.3)^2   overfitting
           - 0.06 * max(0, I - 1)^2                            noisy updates
           + 0.025 * (1 - m(end of epoch e))                   annealed (low-LR) weights are cleaner
           + {64: 0, 128: 0.008, 256: 0.012}[dim]              capacity
           + {0: -0.008, 5: 0, 10: -0.003}[min_snr_gamma]
           - 0.012 * log2(text_encoder_lr / 4.5e-5)^2
           - 0.003 for AdamW8bit

  clipped to [0.2, 0.9]. The scorer reports it plus Gaussian noise (sd 0.008, the spread of a CLIP
  score over 30 prompts), drawn from the config and epoch so every variant sees the same noise.
* Cost: an epoch is ``0.35 h * (1 + 0.15 log2(dim / 64))`` of GPU time (the user's 413 images: 20
  epochs in 6-8 h on an RTX 5080), a scored epoch (samples + CLIP) another 0.03 h.

The ``study.toml`` variant uses the shipped configs/study.toml; ``study.toml+baseline`` adds
configs/base.toml as the user's proven config (``baseline_config``), trained as the first trial.
For each seed a reference random search trains 100 trials without pruning. Per variant the table
gives the true (noise-free) quality of the checkpoint the variant would export (median and IQR over
seeds), its GPU-hours, trials sampled / trained / rejected / pruned, and the share of seeds in which it
got within 2% of the reference's exported checkpoint using at most 25% of the reference's GPU-hours.

    python benchmarks/search_efficiency.py [--seeds 40] [--jobs 2] [--variants a,b] [--reference-trials 100]
"""

from __future__ import annotations

import os

# One thread per process: the searches run in parallel processes, and GPSampler's torch fits slow down
# many times over when every process starts a thread per core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# HyperbandPruner picks a trial's bracket with Python's hash() of a string, which is salted per process
# unless this is set; the spawned search processes inherit it, so every run prints the same table.
os.environ.setdefault("PYTHONHASHSEED", "0")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402

from search.backends.base import EpochCallback, TrainerBackend  # noqa: E402
from search.export import pick_trial  # noqa: E402
from search.scoring import CheckpointScorer, EpochScore  # noqa: E402
from search.settings import StudySettings, load_settings  # noqa: E402
from search.study import make_pruner, make_sampler  # noqa: E402
from search.worker import Worker  # noqa: E402
from training.config import TrainingConfig, load_training_config  # noqa: E402

IMAGES = 413
NOISE_SD = 0.008
EXPLODED = 0.30


def schedule(cfg: TrainingConfig, total: int) -> np.ndarray:
    """The LR multiplier m(t) of every optimizer step, as the named scheduler runs it."""
    t = np.arange(total, dtype=float)
    warm = cfg.lr_warmup_steps if cfg.lr_scheduler != "constant" else 0
    progress = np.clip((t - warm) / max(1, total - warm), 0, 1)
    name = cfg.lr_scheduler
    if name == "cosine":
        m = 0.5 * (1 + np.cos(math.pi * progress))
    elif name == "cosine_with_restarts":
        m = 0.5 * (1 + np.cos(math.pi * ((cfg.lr_scheduler_num_cycles * progress) % 1.0)))
    elif name in ("linear", "polynomial"):
        m = (1 - progress) ** (cfg.lr_scheduler_power if name == "polynomial" else 1.0)
    else:
        m = np.ones(total)
    return np.where(t < warm, t / max(1, warm), m)


@dataclass
class Curve:
    """One config's noise-free quality per epoch (index 0 is epoch 1) and GPU-hours per epoch."""

    quality: np.ndarray
    epoch_hours: float


def instability(cfg: TrainingConfig) -> float:
    ratio = cfg.network_alpha / cfg.network_dim
    return (cfg.effective_unet_lr / 1e-4) * (ratio / 0.5) * math.sqrt(2 / cfg.gradient_accumulation_steps) * (
        1.15 if cfg.optimizer_type == "AdamW8bit" else 1.0)


def static_terms(cfg: TrainingConfig, unstable: float) -> float:
    """The parts of quality that do not change over the epochs."""
    te = cfg.text_encoder_lr or cfg.learning_rate
    return (-0.06 * max(0.0, unstable - 1) ** 2
            + {64: 0.0, 128: 0.008, 256: 0.012}.get(cfg.network_dim, 0.012)
            + {0: -0.008, 5: 0.0, 10: -0.003}.get(int(cfg.min_snr_gamma or 0), -0.003)
            - 0.012 * math.log2(te / 4.5e-5) ** 2
            - (0.003 if cfg.optimizer_type == "AdamW8bit" else 0.0))


def curve(cfg: TrainingConfig) -> Curve:
    """The landscape of the module docstring for one config."""
    epochs = cfg.max_train_epochs
    steps = math.ceil(IMAGES / (cfg.train_batch_size * cfg.gradient_accumulation_steps))
    m = schedule(cfg, epochs * steps)
    ratio = cfg.network_alpha / cfg.network_dim
    ends = np.arange(1, epochs + 1) * steps
    progress = (cfg.effective_unet_lr / 8e-5) * (ratio / 0.5) * np.cumsum(m)[ends - 1] / 470
    unstable = instability(cfg)
    overfit = 0.10 * math.sqrt(cfg.network_dim / 128) * (1 - 1.5 * (cfg.network_dropout or 0.0))
    quality = (0.50 + 0.26 * (1 - np.exp(-2.5 * progress)) - overfit * np.maximum(0, progress - 1.3) ** 2
               + 0.025 * (1 - m[ends - 1]) + static_terms(cfg, unstable))
    warmup_risk = 1 + 0.3 * max(0, 100 - cfg.lr_warmup_steps) / 100
    if unstable * warmup_risk > 2.2:
        quality[int(0.3 * epochs):] = EXPLODED
    hours = 0.35 * (1 + 0.15 * math.log2(cfg.network_dim / 64))
    return Curve(np.clip(quality, 0.2, 0.9), hours)


def noise(cfg: TrainingConfig, epoch: int, seed: int) -> float:
    """Evaluation noise fixed by (config, epoch, seed): every variant meets the same draw."""
    key = repr((sorted((k, v) for k, v in cfg.to_dict().items() if k not in ("output_dir", "logging_dir")),
                epoch, seed))
    digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return float(np.random.default_rng(digest).normal(0.0, NOISE_SD))


class SyntheticLoRA(TrainerBackend, CheckpointScorer):
    """Backend and scorer in one: "trains" along :func:`curve` and scores with noise; counts GPU-hours."""

    SCORE_HOURS = 0.03

    def __init__(self, seed: int):
        self.seed = seed
        self.gpu_hours = 0.0
        self.current: Optional[TrainingConfig] = None
        self.curve: Optional[Curve] = None

    def train(self, config_path: Path, cfg: TrainingConfig, on_epoch: EpochCallback, resume: bool = False) -> None:
        self.current, self.curve = cfg, curve(cfg)
        hours = self.curve.epoch_hours
        every = cfg.save_every_n_epochs or cfg.max_train_epochs
        for epoch in range(1, cfg.max_train_epochs + 1):
            self.gpu_hours += hours
            saved = epoch % every == 0 or epoch == cfg.max_train_epochs
            on_epoch(epoch, Path(config_path).with_name(f"{cfg.output_name}-{epoch:06d}.safetensors") if saved else None)

    def score(self, run_dir: Path, config_path: Path, epoch: int, checkpoint: Path) -> EpochScore:
        self.gpu_hours += self.SCORE_HOURS
        true = float(self.curve.quality[epoch - 1])
        return EpochScore(epoch=epoch, total=true + noise(self.current, epoch, self.seed))


@dataclass(frozen=True)
class Variant:
    name: str
    sampler: str
    pruner: str
    n_trials: int = 20
    n_startup_trials: int = 5
    shipped: bool = False  # sampler and pruner exactly as configs/study.toml sets them
    baseline: bool = False  # configs/base.toml as the user's proven config (baseline_config)


VARIANTS = (
    Variant("study.toml", "", "", shipped=True),
    Variant("study.toml+baseline", "", "", shipped=True, baseline=True),
    Variant("random", "random", "none"),
    Variant("tpe", "tpe", "none"),
    Variant("tpe-startup10", "tpe", "none", n_startup_trials=10),
    Variant("gp", "gp", "none"),
    Variant("tpe+median", "tpe", "median"),
    Variant("tpe+schedule_median", "tpe", "schedule_median"),
    Variant("tpe+hyperband", "tpe", "hyperband"),
    Variant("random+schedule_median", "random", "schedule_median"),
)


@dataclass
class Outcome:
    true_pick: float
    gpu_hours: float
    sampled: int
    trained: int
    rejected: int
    pruned: int
    counts: dict = field(default_factory=dict)


def settings_for(variant: Variant, seed: int, runs_dir: Path) -> StudySettings:
    """Study settings as configs/study.toml would give them, with the variant's sampler and pruner."""
    settings = StudySettings()
    settings.study.name = f"{variant.name}-{seed}"
    settings.study.runs_dir = str(runs_dir)
    settings.study.base_config = str(REPO / "configs" / "base.toml")
    settings.study.search_space = str(REPO / "configs" / "search_space.toml")
    settings.study.seed = seed
    settings.study.n_trials = variant.n_trials
    if variant.baseline:
        settings.study.baseline_config = settings.study.base_config
    if variant.shipped:
        shipped = load_settings(REPO / "configs" / "study.toml")
        settings.sampler, settings.pruner, settings.study.n_trials = shipped.sampler, shipped.pruner, shipped.study.n_trials
    else:
        settings.sampler.type = variant.sampler
        settings.sampler.n_startup_trials = variant.n_startup_trials
        settings.pruner.type = variant.pruner
    settings.__post_init__()
    return settings


def run_search(variant: Variant, seed: int) -> Outcome:
    """One search by the real Worker on the synthetic landscape; what it would export, and its cost."""
    # trial folders in memory where there is a tmpfs: the worker's atomic writes fsync every file
    scratch = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="lora-search-bench-", dir=scratch) as tmp:
        settings = settings_for(variant, seed, Path(tmp))
        study = optuna.create_study(direction="maximize", sampler=make_sampler(settings),
                                    pruner=make_pruner(settings))
        synthetic = SyntheticLoRA(seed)
        Worker(settings, backend=synthetic, scorer=synthetic, study=study).run()
        trials = study.get_trials(deepcopy=False)
        picked = pick_trial(study, None)
        cfg = load_training_config(Path(picked.user_attrs["run_dir"]) / "config.toml")
        true = float(curve(cfg).quality[picked.user_attrs["best_epoch"] - 1])
        reasons = [t.user_attrs.get("prune_reason") for t in trials]
        return Outcome(true, synthetic.gpu_hours, len(trials), sum(bool(t.user_attrs.get("accepted")) for t in trials),
                       sum(r in ("constraint", "vram") for r in reasons), reasons.count("quality"))


def _task(args: tuple[Variant, int]) -> tuple[str, int, Outcome]:
    logging.disable(logging.WARNING)  # the worker's per-trial log lines are not the point here
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    variant, seed = args
    return variant.name, seed, run_search(variant, seed)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = np.percentile(xs, [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def table(results: dict[str, dict[int, Outcome]], reference: str, variants: list[str]) -> str:
    ref = results[reference]
    head = (f"{'variant':<24} {'pick median':>11} {'IQR':>13} {'mean':>6} {'GPU-h':>7} {'sampled':>7} {'trained':>7} "
            f"{'rejected':>8} {'pruned':>6} {'within 2% @<=25% GPU-h':>22}")
    lines = [head, "-" * len(head)]
    for name in [reference] + variants:
        runs = results[name]
        q1, med, q3 = quartiles([o.true_pick for o in runs.values()])
        ok = [o.true_pick >= 0.98 * ref[s].true_pick and o.gpu_hours <= 0.25 * ref[s].gpu_hours
              for s, o in runs.items()]
        share = "-" if name == reference else f"{sum(ok)}/{len(ok)} ({100 * sum(ok) / len(ok):.0f}%)"
        mean = lambda attr: statistics.mean(getattr(o, attr) for o in runs.values())  # noqa: E731
        lines.append(f"{name:<24} {med:>11.4f} {f'{q1:.4f}-{q3:.4f}':>13} {mean('true_pick'):>6.4f} {statistics.median(o.gpu_hours for o in runs.values()):>7.0f} "
                     f"{mean('sampled'):>7.1f} {mean('trained'):>7.1f} {mean('rejected'):>8.1f} {mean('pruned'):>6.1f} "
                     f"{share:>22}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=40, help="seeds per variant (default: 40)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                        help="comma-separated variant names (default: all)")
    parser.add_argument("--reference-trials", type=int, default=100,
                        help="trials of the reference random search (default: 100)")
    args = parser.parse_args(argv)
    known = {v.name: v for v in VARIANTS}
    chosen = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    reference = Variant(f"random-{args.reference_trials}", "random", "none", n_trials=args.reference_trials)
    tasks = [(v, seed) for v in [reference] + [known[n] for n in chosen] for seed in range(args.seeds)]
    started = time.perf_counter()
    results: dict[str, dict[int, Outcome]] = {}
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for done, (name, seed, outcome) in enumerate(pool.imap_unordered(_task, tasks), 1):
            results.setdefault(name, {})[seed] = outcome
            print(f"\r{done}/{len(tasks)} searches", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(table(results, reference.name, chosen))
    print(f"{args.seeds} seeds, {len(tasks)} searches in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
