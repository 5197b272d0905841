"""The search space: ``configs/search_space.toml`` loaded strictly into Optuna distributions.

Parameter names are the kohya keys they set, so a trial's params read like a config. Two names are
special: ``network_alpha_ratio`` sets ``network_alpha = int(network_dim * ratio)`` and
``learning_rate`` also sets ``unet_lr`` (see :func:`apply_params`). A ``constant`` schedule with warmup
(which sd-scripts refuses) is written as ``constant_with_warmup``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from training.config import FIELDS, config_from_dict, read_toml, value_type
from training.errors import ConfigError

ALPHA_RATIO = "network_alpha_ratio"
PARAM_NAMES = frozenset(FIELDS) | {ALPHA_RATIO}
_SPEC_KEYS = ("choices", "low", "high", "step", "log", "value")


@dataclass(frozen=True)
class SearchSpace:
    """Sampled parameters (name -> distribution) and fixed ones (name -> value), in file order."""

    distributions: dict[str, BaseDistribution]
    fixed: dict[str, Any]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample every parameter on ``trial``; returns sampled and fixed values together."""
        values = {name: _suggest(trial, name, dist) for name, dist in self.distributions.items()}
        return {**self.fixed, **values}


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def _nearest(name: str, options) -> str:
    near = difflib.get_close_matches(name, list(options), n=1)
    return f"did you mean '{near[0]}'?" if near else "use a key of the training config"


def _is_whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _range_distribution(name: str, spec: dict[str, Any], where: str) -> BaseDistribution:
    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), spec.get("log", False)
    numbers = [x for x in (low, high, step) if x is not None]
    if low is None or high is None or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in numbers):
        raise ConfigError(f"{where}: [{name}] needs numeric low and high (and an optional numeric step)")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: [{name}] log must be true or false")
    if low > high:
        raise ConfigError(f"{where}: [{name}] low {low} is above high {high}")
    if log and (step is not None or low <= 0):
        raise ConfigError(f"{where}: [{name}] log = true needs low > 0 and no step")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}: [{name}] step must be positive")
    try:
        if all(_is_whole(x) for x in numbers) and name in FIELDS and value_type(name) is int:
            return IntDistribution(low, high, log=log, step=step or 1)
        return FloatDistribution(float(low), float(high), log=log, step=step)
    except ValueError as exc:
        raise ConfigError(f"{where}: [{name}] {exc}") from None


def _distribution(name: str, spec: Any, where: str) -> tuple[Optional[BaseDistribution], Any]:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: '{name}' must be a table, e.g. [{name}] choices = [...]")
    for key in spec:
        if key not in _SPEC_KEYS:
            raise ConfigError(f"{where}: [{name}] unknown key '{key}'; {_nearest(key, _SPEC_KEYS)}")
    kinds = [k for k in ("choices", "value") if k in spec] + (["range"] if {"low", "high"} & spec.keys() else [])
    if len(kinds) != 1:
        raise ConfigError(f"{where}: [{name}] give exactly one of choices = [...], low/high, or value")
    if "value" in spec:
        return None, spec["value"]
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: [{name}] choices must be a non-empty list")
        return CategoricalDistribution(choices), None
    return _range_distribution(name, spec, where), None


def _check_values(name: str, dist: Optional[BaseDistribution], fixed: Any, where: str) -> None:
    """Every value the parameter can take must be valid for its config key."""
    if name == ALPHA_RATIO:
        values = [dist.low, dist.high] if isinstance(dist, (FloatDistribution, IntDistribution)) else (
            dist.choices if dist is not None else [fixed])
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 for v in values):
            raise ConfigError(f"{where}: [{name}] must stay within (0, 1]")
        return
    if isinstance(dist, CategoricalDistribution):
        values = list(dist.choices)
    elif dist is not None:
        values = [dist.low, dist.high]
    else:
        values = [fixed]
    # a warmup is judged on a schedule that has one (the default "constant" refuses any warmup)
    context = {"lr_scheduler": "constant_with_warmup"} if name == "lr_warmup_steps" else {}
    for value in values:
        try:
            config_from_dict({**context, name: value}, where)
        except ConfigError as exc:
            raise ConfigError(f"{where}: [{name}] value {value!r} is not usable: {exc}") from None


def space_from_dict(data: dict[str, Any], where: str = "search space") -> SearchSpace:
    distributions: dict[str, BaseDistribution] = {}
    fixed: dict[str, Any] = {}
    for name, spec in data.items():
        if name not in PARAM_NAMES:
            raise ConfigError(f"{where}: unknown parameter '{name}'; {_nearest(name, PARAM_NAMES)}")
        dist, value = _distribution(name, spec, where)
        _check_values(name, dist, value, where)
        if dist is None:
            fixed[name] = value
        else:
            distributions[name] = dist
    if ALPHA_RATIO in data and "network_alpha" in data:
        raise ConfigError(f"{where}: set network_alpha_ratio or network_alpha, not both")
    return SearchSpace(distributions, fixed)


def load_search_space(path: str | Path) -> SearchSpace:
    """Read ``search_space.toml``; an unknown parameter or malformed table is an error naming it."""
    return space_from_dict(read_toml(path, "search space"), str(path))


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Base config values with the trial's params applied, as the trainer will see them.

    ``network_alpha = int(network_dim * network_alpha_ratio)``: the product is rounded to 6 decimals
    before ``int()`` so a ratio such as 0.7500000000000001 from float arithmetic does not drop a unit.
    """
    values = dict(base)
    for name, value in params.items():
        if name != ALPHA_RATIO:
            values[name] = value
    if "learning_rate" in params:
        values["unet_lr"] = params["learning_rate"]
    if ALPHA_RATIO in params:
        values["network_alpha"] = float(int(round(values["network_dim"] * params[ALPHA_RATIO], 6)))
    return kohya_schedule(values)


def kohya_schedule(values: dict[str, Any]) -> dict[str, Any]:
    """``constant`` with warmup becomes ``constant_with_warmup``: sd-scripts refuses the former, and the
    warmup was sampled (or set) on purpose, so it is kept rather than dropped."""
    if values.get("lr_scheduler") == "constant" and values.get("lr_warmup_steps", 0) > 0:
        return {**values, "lr_scheduler": "constant_with_warmup"}
    return values
