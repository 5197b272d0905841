"""Where tensors live: the device a run trains on, mixed precision, and copies to the device that never wait.

The lowest layer of ``training``: it imports nothing of the package, so the model loading
(``training.models``), the fast step (``training.fast``), sampling and the loop can all use it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch


def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> Any:
    """Mixed precision in ``dtype`` on ``device``'s type; a no-op context when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; a CPU tensor goes to a GPU through pinned memory without blocking the host."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def pin(batch: Any) -> Any:
    """The batch with its latents / pixels / loss weights in pinned memory (for :func:`to_device`); unchanged
    without CUDA."""
    if not torch.cuda.is_available():
        return batch
    for name in ("latents", "pixels", "weights"):
        tensor = getattr(batch, name, None)
        if tensor is not None and not tensor.is_pinned():
            setattr(batch, name, tensor.pin_memory())
    return batch
