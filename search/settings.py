"""``configs/study.toml``: study name, storage, budget, sampler, pruner, trainer backend, scorer, paths.

Loaded strictly: every section and key is a dataclass field; anything else is an error naming the
nearest valid key. Relative paths are relative to the directory lora-search runs in.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from training.config import read_toml
from training.errors import ConfigError

PRUNERS = ("none", "schedule_median", "median", "hyperband", "successive_halving")
SAMPLERS = ("tpe", "random", "gp")
BACKENDS = ("builtin", "kohya")
SCORERS = ("clip", "command")


@dataclass
class StudySection:
    name: str = "lora-search"
    storage: str = ""  # empty: SQLite at runs_dir/<name>/study.db
    n_trials: int = 20  # trials that train; constraint rejections do not count
    seed: int = 42
    direction: str = "maximize"
    runs_dir: str = "runs"
    base_config: str = "configs/base.toml"
    preset: str = ""  # configs/presets/ name (character, style, concept, turbo, deturbo) over base_config; "": none
    search_space: str = "configs/search_space.toml"
    evaluator_config: str = "configs/evaluator.toml"
    heartbeat_interval: int = 60  # seconds; RDB storages only
    grace_period: int = 300  # a RUNNING trial silent this long is stale
    max_retry: int = 3  # times a trial whose worker died is re-queued to continue its run
    gpu_memory_gb: float = 16.0  # trials whose VRAM estimate exceeds this are rejected before training
    baseline_config: str = ""  # the user's proven training config, trained as the first trial; empty: none


@dataclass
class SamplerSection:
    type: str = "tpe"  # tpe | random | gp (see benchmarks/search_efficiency.py for how they compare)
    n_startup_trials: int = 5  # tpe, gp: random trials before the model is used
    multivariate: bool = True
    group: bool = True
    constant_liar: bool = True


@dataclass
class PrunerSection:
    type: str = "schedule_median"  # chosen by benchmarks/search_efficiency.py (README, "Search efficiency")
    n_startup_trials: int = 3  # median, schedule_median: trials finished before pruning starts
    n_warmup_steps: int = 4  # median: epochs before a trial can be pruned
    min_fraction: float = 0.5  # schedule_median: share of its own epochs a trial runs before it can be pruned
    interval_steps: int = 1
    min_resource: int = 2  # hyperband / successive_halving, in epochs
    reduction_factor: int = 3


@dataclass
class BackendSection:
    type: str = "builtin"
    # kohya: the sd-scripts command line; {config} is the trial's config.toml, {run_dir} its folder.
    command: list = field(default_factory=lambda: [
        "accelerate", "launch", "train_network.py", "--config_file", "{config}"])
    poll_seconds: float = 2.0


@dataclass
class ScorerSection:
    type: str = "clip"
    # command: prints the checkpoint's score as the last line of its output;
    # {checkpoint}, {epoch}, {run_dir} and {config} are filled in.
    command: list = field(default_factory=list)
    # 0..1: how much people's ratings and comparisons in optuna-dashboard count in the value that
    # status ranks and export picks: (1 - w) * score + w * human score (search/ratings.py)
    human_weight: float = 0.0
    compare_top: int = 4  # the best trials by score shown side by side in the dashboard's comparison view


@dataclass
class StudySettings:
    # True when the command line set the budget (--n-trials); otherwise a budget the study remembers
    # from ``start --n-trials`` wins over study.toml's (see search.study.open_study).
    budget_given: ClassVar[bool] = False

    study: StudySection = field(default_factory=StudySection)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    pruner: PrunerSection = field(default_factory=PrunerSection)
    backend: BackendSection = field(default_factory=BackendSection)
    scorer: ScorerSection = field(default_factory=ScorerSection)

    def __post_init__(self) -> None:
        checks = [
            (self.pruner.type in PRUNERS, "pruner.type", self.pruner.type, ", ".join(PRUNERS)),
            (self.sampler.type in SAMPLERS, "sampler.type", self.sampler.type, ", ".join(SAMPLERS)),
            (0 <= self.pruner.min_fraction <= 1, "pruner.min_fraction", self.pruner.min_fraction,
             "a fraction of the schedule within [0, 1]"),
            (self.backend.type in BACKENDS, "backend.type", self.backend.type, ", ".join(BACKENDS)),
            (self.scorer.type in SCORERS, "scorer.type", self.scorer.type, ", ".join(SCORERS)),
            (self.study.direction in ("maximize", "minimize"), "study.direction", self.study.direction,
             "maximize or minimize"),
            (self.study.n_trials >= 1, "study.n_trials", self.study.n_trials, "a number of at least 1"),
            (self.study.gpu_memory_gb > 0, "study.gpu_memory_gb", self.study.gpu_memory_gb, "the GPU's memory in GB"),
            (self.sampler.n_startup_trials >= 0, "sampler.n_startup_trials", self.sampler.n_startup_trials,
             "0 or more"),
            (self.scorer.type != "command" or bool(self.scorer.command), "scorer.command", self.scorer.command,
             "a command line such as [\"python\", \"score.py\", \"{checkpoint}\"]"),
            (bool(self.study.name.strip()) and "/" not in self.study.name, "study.name", self.study.name,
             "a non-empty name without '/'"),
            (0 <= self.scorer.human_weight <= 1, "scorer.human_weight", self.scorer.human_weight,
             "a weight within [0, 1] (0: the score alone decides)"),
            (self.scorer.human_weight == 0 or self.study.direction == "maximize", "scorer.human_weight",
             self.scorer.human_weight, 'human_weight = 0 with study.direction = "minimize" (ratings are higher-is-better)'),
            (self.scorer.compare_top >= 0, "scorer.compare_top", self.scorer.compare_top,
             "0 (no comparison view) or the number of top trials to compare"),
        ]
        for ok, key, value, fix in checks:
            if not ok:
                raise ConfigError(f"{key} = {value!r}: use {fix}")

    @property
    def study_dir(self) -> Path:
        return Path(self.study.runs_dir) / self.study.name


def _section(cls: type, data: Any, name: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: [{name}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean '{near[0]}'?" if near else "remove it"
            raise ConfigError(f"{where}: unknown key '{key}' in [{name}]; {hint}")
        default = getattr(cls(), key)
        if type(default) is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"{where}: [{name}] {key} = {value!r} should be a {type(default).__name__}")
    return cls(**data)


def settings_from_dict(data: dict[str, Any], where: str = "study config") -> StudySettings:
    sections = {f.name: f for f in dataclasses.fields(StudySettings)}
    built = {}
    for name, value in data.items():
        if name not in sections:
            near = difflib.get_close_matches(name, sections, n=1)
            hint = f"did you mean [{near[0]}]?" if near else "remove it"
            raise ConfigError(f"{where}: unknown section [{name}]; {hint}")
        built[name] = _section(sections[name].default_factory, value, name, where)
    try:
        return StudySettings(**built)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_settings(path: Optional[str | Path], study: Optional[str] = None, storage: Optional[str] = None,
                  n_trials: Optional[int] = None) -> StudySettings:
    """Read ``study.toml`` (defaults when ``path`` is None) and apply command-line overrides."""
    settings = settings_from_dict(read_toml(path, "study config"), str(path)) if path else StudySettings()
    if study is not None:
        settings.study.name = study
    if storage is not None:
        settings.study.storage = storage
    if n_trials is not None:
        settings.study.n_trials = n_trials
        settings.budget_given = True
    settings.__post_init__()
    return settings
