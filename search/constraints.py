"""The seven safety constraints: combinations that waste a GPU night, refused before training.

They are evaluated on the concrete training values of a config (what the trainer would really use),
never on sampler internals, so ``lora-search check`` and the study always agree:

- ``lr`` is the UNet learning rate as applied: ``unet_lr`` when set, else ``learning_rate`` (in a
  trial config both are the sampled ``learning_rate``);
- ``ratio`` is ``network_alpha / network_dim`` of the config, i.e. after the study's ``int()``
  truncation of alpha (ratio 0.85 at dim 64 gives alpha 54, ratio 0.844);
- ``epochs`` is ``max_train_epochs``. A steps-based config (no ``max_train_epochs``) cannot show it
  trains 16 epochs, so it is checked as if it trained fewer.

Comparisons are strict where the rule says ``>``: ``lr > 1e-4`` lets 1e-4 itself pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from training.config import TrainingConfig


@dataclass(frozen=True)
class Values:
    """The numbers the constraints look at, read off a :class:`TrainingConfig`."""

    lr: float
    optimizer: str
    dim: int
    alpha: float
    epochs: int
    grad_accum: int
    warmup: int

    @property
    def ratio(self) -> float:
        return self.alpha / self.dim

    @classmethod
    def of(cls, cfg: TrainingConfig) -> "Values":
        return cls(
            lr=cfg.effective_unet_lr,
            optimizer=cfg.optimizer_type,
            dim=cfg.network_dim,
            alpha=cfg.network_alpha,
            epochs=cfg.max_train_epochs if cfg.max_train_epochs is not None else 0,
            grad_accum=cfg.gradient_accumulation_steps,
            warmup=cfg.lr_warmup_steps,
        )


@dataclass(frozen=True)
class Constraint:
    id: int
    rule: str
    reason: str
    violated: Callable[[Values], bool]


def _ratio_needs_stable_setup(v: Values) -> bool:
    stable = v.epochs >= 16 and v.grad_accum >= 2 and v.optimizer == "AdamW" and v.warmup >= 150
    return v.ratio >= 0.75 and not stable


CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint(1, "lr > 1.2e-4 with optimizer_type AdamW8bit",
               "8-bit optimizer states plus a high learning rate blow up the gradient noise",
               lambda v: v.lr > 1.2e-4 and v.optimizer == "AdamW8bit"),
    Constraint(2, "|network_alpha - network_dim| < 1",
               "alpha equal to dim scales the update by 1.0 and removes the regularization; training turns unstable",
               lambda v: abs(v.alpha - v.dim) < 1),
    Constraint(3, "network_dim >= 256 with max_train_epochs < 16",
               "a rank-256 network needs at least 16 epochs to converge",
               lambda v: v.dim >= 256 and v.epochs < 16),
    Constraint(4, "lr > 1e-4 with lr_warmup_steps < 100",
               "a high learning rate from the first steps explodes the gradients; warm up for 100+ steps",
               lambda v: v.lr > 1e-4 and v.warmup < 100),
    Constraint(5, "gradient_accumulation_steps == 1 with lr > 1.1e-4",
               "a small effective batch with a high learning rate gives unstable updates",
               lambda v: v.grad_accum == 1 and v.lr > 1.1e-4),
    Constraint(6, "alpha/dim >= 0.75 without ALL of: epochs >= 16, grad-accum >= 2, AdamW (not 8-bit), warmup >= 150",
               "a high alpha ratio needs a rock-solid setup (16+ epochs, accumulation 2+, 32-bit AdamW, 150+ warmup)",
               _ratio_needs_stable_setup),
    Constraint(7, "alpha/dim >= 0.85 with lr > 1e-4",
               "a near-maximal alpha ratio with a high learning rate almost always diverges",
               lambda v: v.ratio >= 0.85 and v.lr > 1e-4),
)


def violations(cfg: TrainingConfig) -> list[Constraint]:
    """Every constraint the config breaks, in id order (empty when it is safe)."""
    values = Values.of(cfg)
    return [c for c in CONSTRAINTS if c.violated(values)]


def describe(constraint: Constraint) -> str:
    return f"constraint {constraint.id} ({constraint.rule}): {constraint.reason}"
