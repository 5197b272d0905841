"""The user's proven configuration as the study's first trial, and every other trial measured against it.

``[study] baseline_config`` (or ``start --baseline FILE``) names a training config the user trusts.
It is enqueued once per study: its values mapped onto the space's params (``network_alpha_ratio`` from
its alpha and dim, ``learning_rate`` from its UNet rate), and its other keys kept for that trial, laid
over the base config. A baseline outside the space, against a safety constraint or over the VRAM budget
is an error naming the value and the fix, never dropped silently.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from search.constraints import describe, violations
from search.errors import ConfigError
from search.space import ALPHA_RATIO, SearchSpace
from search.trial_config import trial_values
from training.config import TrainingConfig, config_from_dict
from training.presets import load_config_values
from training.vram import estimate_vram

# Keys the baseline trial never takes from the proven config: each trial writes to its own folder.
OWN_KEYS = ("output_dir", "logging_dir")


def _ratio_on_grid(dist: BaseDistribution, dim: int, alpha: float) -> Optional[float]:
    """The ratio of the space that gives exactly ``alpha`` at ``dim`` (alpha = int(dim * ratio))."""
    if isinstance(dist, CategoricalDistribution):
        candidates = list(dist.choices)
    elif dist.step is not None:
        n = int(round((dist.high - dist.low) / dist.step))
        candidates = [round(dist.low + k * dist.step, 10) for k in range(n + 1)]
    else:
        return alpha / dim if dist.low <= alpha / dim <= dist.high else None
    return next((r for r in candidates if int(round(dim * r, 6)) == int(alpha)), None)


def _in_space(dist: BaseDistribution, value: Any) -> Optional[Any]:
    """``value`` as the distribution holds it, or None when the space cannot produce it."""
    if isinstance(dist, CategoricalDistribution):
        # True == 1 in Python: a bool matches only a bool choice
        return next((c for c in dist.choices if c == value and isinstance(c, bool) == isinstance(value, bool)), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(dist, IntDistribution) and float(value) != int(value):
        return None
    value = int(value) if isinstance(dist, IntDistribution) else float(value)
    return value if dist._contains(dist.to_internal_repr(value)) else None


def _describe_dist(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return "choices " + ", ".join(map(str, dist.choices))
    step = f" step {dist.step:g}" if dist.step is not None else ""
    return f"{dist.low:g}..{dist.high:g}{step}"


def _param_value(name: str, cfg: TrainingConfig) -> Any:
    if name == "learning_rate":
        return cfg.effective_unet_lr
    return getattr(cfg, name)


def baseline_params(space: SearchSpace, cfg: TrainingConfig, where: str, space_path: str) -> dict[str, Any]:
    """The space's params that reproduce ``cfg``; an error naming the first value the space cannot take."""
    params: dict[str, Any] = {}
    for name, dist in space.distributions.items():
        if name == ALPHA_RATIO:
            value = _ratio_on_grid(dist, cfg.network_dim, cfg.network_alpha)
            shown = f"network_alpha {cfg.network_alpha:g} at network_dim {cfg.network_dim}"
        else:
            raw = _param_value(name, cfg)
            value, shown = _in_space(dist, raw), f"{name} = {raw!r}"
        if value is None:
            raise ConfigError(f"baseline {where}: {shown} is outside the search space ({name}: {_describe_dist(dist)} "
                              f"in {space_path}); widen the space or change the baseline")
        params[name] = value
    return params


def load_baseline(path: str | Path, space: SearchSpace, base: dict[str, Any], space_path: str,
                  gpu_memory_gb: float, study_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, kept values) of the proven config, checked like a sampled trial would be."""
    where = str(path)
    kept = {k: v for k, v in load_config_values(path).items() if k not in OWN_KEYS}
    merged = config_from_dict({**base, **kept}, f"baseline {where}")
    params = baseline_params(space, merged, where, space_path)
    cfg = config_from_dict(trial_values({**base, **kept}, {**space.fixed, **params}, study_dir / "baseline"),
                           f"baseline {where}")
    fired = violations(cfg)
    if fired:
        raise ConfigError(f"baseline {where} violates {describe(fired[0])}; fix the baseline or leave baseline_config empty")
    vram = estimate_vram(cfg).total_gib
    if vram > gpu_memory_gb:
        raise ConfigError(f"baseline {where}: VRAM estimate {vram:.1f} GiB exceeds gpu_memory_gb = {gpu_memory_gb:g}; "
                          "raise gpu_memory_gb or lower the baseline's batch size")
    return params, kept


def has_baseline(study: optuna.Study) -> bool:
    return any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False))


def enqueue_baseline(study: optuna.Study, path: str | Path, params: dict[str, Any], kept: dict[str, Any]) -> bool:
    """Queue the baseline unless the study already has one; returns whether it was queued now."""
    if has_baseline(study):
        return False
    study.enqueue_trial(params, user_attrs={"baseline": True, "baseline_config": str(path), "baseline_values": kept})
    return True


def baseline_trial(trials: list[FrozenTrial]) -> Optional[FrozenTrial]:
    """The baseline trial with a score (a crashed one's retry carries the mark too), else any marked one."""
    marked = [t for t in trials if t.user_attrs.get("baseline")]
    complete = [t for t in marked if t.state == TrialState.COMPLETE]
    return (complete or marked or [None])[-1]


def versus(score: Optional[float], baseline: Optional[FrozenTrial]) -> str:
    """``+0.031 vs baseline``; empty when either score is missing."""
    if score is None or baseline is None or baseline.value is None or not math.isfinite(score):
        return ""
    return f"{score - baseline.value:+.3f} vs baseline"


def queue_baseline(study: optuna.Study, settings, space: SearchSpace, base: dict[str, Any],
                   path: Optional[str | Path] = None) -> bool:
    """Check the study's baseline config (or ``path``) and queue it once; returns whether it was queued now."""
    path = path or settings.study.baseline_config
    if has_baseline(study):  # checked once, when queued; a later edit of the space does not stop workers
        return False
    params, kept = load_baseline(path, space, base, settings.study.search_space, settings.study.gpu_memory_gb,
                                 settings.study_dir)
    return enqueue_baseline(study, path, params, kept)
