"""Rectified-flow (flow-matching) training math shared by SD3/SD3.5 and Z-Image.

The noisy input is the straight line between the clean latent and the noise,
``x_t = (1 - sigma) * x0 + sigma * noise``, and the velocity the model learns is ``noise - x0``.
``sigma`` is drawn per sample as sd-scripts' ``sd3_train_network.py`` does (the SD3 paper's convention:
``sigma`` is the noise level, so a positive ``logit_mean`` trains more on noisy inputs):

1. ``u`` from diffusers' ``compute_density_for_timestep_sampling``: ``logit_normal`` (sigmoid of a normal
   draw with ``logit_mean``/``logit_std``), ``mode`` (``mode_scale``), else uniform (``uniform``, ``none``,
   ``sigma_sqrt``, ``cosmap``: the last two weight the loss instead, diffusers'
   ``compute_loss_weighting_for_sd3``);
2. ``training_shift`` ``s`` moves it toward noise: ``s*u / (1 + (s-1)*u)`` (1.0: unchanged);
3. rounded onto the 1000-step table the reference trainers index, ``sigma`` in ``{0.001, ..., 1.0}``
   (never 0, so ``sigma_sqrt``'s ``sigma**-2`` stays finite).

Nothing here knows a model: how each transformer takes ``sigma``, what sign its output has and which
target its loss compares with live in :mod:`training.dit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from training.config import WEIGHTING_SCHEMES
from training.errors import ConfigError

TABLE_STEPS = 1000


@dataclass(frozen=True)
class FlowSettings:
    """Timestep sampling of a flow-matching run, in sd-scripts' argument names and defaults."""

    weighting_scheme: str = "uniform"  # see WEIGHTING_SCHEMES
    logit_mean: float = 0.0  # logit_normal: mean of the normal draw
    logit_std: float = 1.0  # logit_normal: its standard deviation
    mode_scale: float = 1.29  # mode: how strongly the middle of the schedule is favoured
    training_shift: float = 1.0  # > 1 trains more on noisy inputs (composition), < 1 on details

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ConfigError(f"weighting_scheme = {self.weighting_scheme!r}: use one of "
                              + ", ".join(WEIGHTING_SCHEMES))
        if not (math.isfinite(self.training_shift) and self.training_shift > 0):
            raise ConfigError(f"training_shift = {self.training_shift!r}: must be a number > 0 (1.0 = no shift)")
        if not (math.isfinite(self.logit_std) and self.logit_std > 0):
            raise ConfigError(f"logit_std = {self.logit_std!r}: must be a number > 0")
        for key in ("logit_mean", "mode_scale"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{key} = {getattr(self, key)!r}: must be a finite number")

    @classmethod
    def from_config(cls, cfg: Any) -> "FlowSettings":
        """The settings of a :class:`~training.config.TrainingConfig` (or anything with those attributes)."""
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Map ``u`` in [0, 1] through the time shift ``s*u / (1 + (s-1)*u)`` (the identity at ``shift`` 1)."""
    return u * shift / (1 + (shift - 1) * u)


def sample_sigmas(settings: FlowSettings, batch_size: int, device: torch.device | str = "cpu",
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One noise level per sample, float32 of shape ``(batch_size,)``, on the 1000-step table."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme=settings.weighting_scheme, batch_size=batch_size, logit_mean=settings.logit_mean,
        logit_std=settings.logit_std, mode_scale=settings.mode_scale, device=device, generator=generator)
    u = shift_sigmas(u.clamp(0, 1), settings.training_shift)
    index = (u * TABLE_STEPS).long().clamp(0, TABLE_STEPS - 1)
    return (index + 1).float() / TABLE_STEPS


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) * x0 + sigma * noise``, one ``sigma`` per sample."""
    s = _per_sample(sigmas, latents)
    return (1 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow's velocity ``d x_t / d sigma = noise - x0``."""
    return noise - latents


def loss_weights(settings: FlowSettings, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights: 1, except ``sigma_sqrt`` (``sigma**-2``) and ``cosmap``."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(settings.weighting_scheme, sigmas.float()).float()


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor,
                 settings: FlowSettings) -> torch.Tensor:
    """Per-sample mean squared error, shape ``(B,)``, times :func:`loss_weights` (computed in float32)."""
    error = ((prediction.float() - target.float()) ** 2).reshape(prediction.shape[0], -1).mean(dim=1)
    return loss_weights(settings, sigmas.to(error.device)) * error
