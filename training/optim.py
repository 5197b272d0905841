"""Optimizers and learning-rate schedulers by their sd-scripts names."""

from __future__ import annotations

import ast
import importlib
from typing import Any

import torch

from training.config import TrainingConfig
from training.errors import ConfigError


def parse_optimizer_args(items: list[str]) -> dict[str, Any]:
    """``["weight_decay=0.01", "betas=(0.9,0.99)"]`` -> keyword arguments (values read as Python literals)."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, _, text = item.partition("=")
        key, text = key.strip(), text.strip()
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word such as a mode name
        kwargs[key] = value
    return kwargs


def _bnb(name: str) -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"optimizer_type = {name!r} needs bitsandbytes; pip install bitsandbytes or use AdamW") from None
    return bnb.optim


def _require(module: str, attr: str, name: str, package: str) -> Any:
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError:
        raise ConfigError(f"optimizer_type = {name!r} needs the {package} package; pip install {package} or pick another optimizer") from None


def _optimizer_class(name: str) -> tuple[Any, dict[str, Any]]:
    """The optimizer class for a kohya name and the defaults sd-scripts adds."""
    if name == "AdamW":
        return torch.optim.AdamW, {}
    if name == "AdamW8bit":
        return _bnb(name).AdamW8bit, {}
    if name == "Lion":
        try:
            return _require("lion_pytorch", "Lion", name, "lion-pytorch"), {}
        except ConfigError:
            return _bnb(name).Lion, {}  # bitsandbytes ships a 32-bit Lion too
    if name == "Lion8bit":
        return _bnb(name).Lion8bit, {}
    if name == "SGDNesterov":
        return torch.optim.SGD, {"nesterov": True, "momentum": 0.9}
    if name == "SGDNesterov8bit":
        return _bnb(name).SGD8bit, {"nesterov": True, "momentum": 0.9}
    if name == "Prodigy":
        return _require("prodigyopt", "Prodigy", name, "prodigyopt"), {}
    if name == "AdaFactor":
        from transformers.optimization import Adafactor

        # With an explicit lr sd-scripts turns off Adafactor's relative step.
        return Adafactor, {"relative_step": False, "scale_parameter": False, "warmup_init": False}
    raise ConfigError(f"optimizer_type = {name!r}: unknown optimizer; use AdamW, AdamW8bit, Lion, SGDNesterov or Prodigy")


def build_optimizer(cfg: TrainingConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer_type`` over ``param_groups`` with ``cfg.optimizer_args``."""
    cls, defaults = _optimizer_class(cfg.optimizer_type)
    kwargs = {**defaults, **parse_optimizer_args(cfg.optimizer_args)}
    if cls is torch.optim.AdamW and not {"fused", "foreach"} & kwargs.keys() and _all_on_cuda(param_groups):
        kwargs["fused"] = True  # one kernel for every parameter's update, and no wait for the GPU under fp16
    try:
        return cls(param_groups, lr=cfg.learning_rate, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"optimizer_args = {cfg.optimizer_args!r}: {cfg.optimizer_type} rejects them ({exc}); fix the names") from None
    except ValueError as exc:
        raise ConfigError(f"optimizer_args = {cfg.optimizer_args!r}: {exc}") from None


def _all_on_cuda(param_groups: list[dict]) -> bool:
    params = [p for group in param_groups for p in group["params"]]
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def build_scheduler(cfg: TrainingConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """The diffusers scheduler ``cfg.lr_scheduler`` over ``total_steps`` optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total_steps,
        num_cycles=cfg.lr_scheduler_num_cycles, power=cfg.lr_scheduler_power,
    )
