"""A training adapter: a LoRA merged into the base before training and cancelled only while sampling.

Step-distilled models (Z-Image Turbo) lose their few-step ability when a LoRA trains on them directly.
A "training adapter" (a LoRA made to undo the distillation, e.g. ostris' for Z-Image Turbo) is merged
into the base at +1 before training, so the new LoRA learns against the de-distilled model; while
sampling it is cancelled (-1), so samples, like the saved LoRA, are for the turbo model itself.

The merge changes the base weights once, deterministically (resumed runs merge the same); the
cancelling is a forward hook that subtracts the adapter's update, so nothing is rounded twice and the
weights after sampling are bit-for-bit those before.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from training.dit import DitFamily
from training.errors import LoraSearchError
from training.network import read_lora_file


class TrainingAdapter:
    """A LoRA file in the family's format (or ai-toolkit's peft keys, alpha = rank) for one transformer."""

    def __init__(self, transformer: nn.Module, family: DitFamily, path: str | Path):
        self.transformer = transformer
        self.path = Path(path)
        self.entries = family.read_file_state_dict(read_lora_file(self.path, "training_adapter"))
        if not self.entries:
            raise LoraSearchError(f"training_adapter {self.path}: no {family.name} LoRA keys "
                                  f"({family.file_format.prefix}...lora_A.weight) found; "
                                  "is it an adapter for this model?")
        modules = dict(transformer.named_modules())
        for module_path, (down, up, _) in self.entries.items():
            layer = _base_linear(modules.get(module_path))
            if layer is None or tuple(layer.weight.shape) != (up.shape[0], down.shape[1]):
                raise LoraSearchError(f"training_adapter {self.path}: {module_path} does not match a Linear of this "
                                      f"{family.name} transformer; is it an adapter for this model?")

    def merge(self) -> None:
        """Add the adapter's update to the base weights (before fp8 storage and before the LoRA is added)."""
        modules = dict(self.transformer.named_modules())
        with torch.no_grad():
            for module_path, (down, up, scale) in self.entries.items():
                weight = _base_linear(modules[module_path]).weight
                delta = scale * (up.float() @ down.float())
                weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))

    @contextmanager
    def removed(self) -> Iterator[None]:
        """Within the block, each adapted module's output has the adapter's update subtracted (sampling)."""
        modules = dict(self.transformer.named_modules())
        handles = [modules[path].register_forward_hook(_subtract(down, up, scale))
                   for path, (down, up, scale) in self.entries.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _subtract(down: torch.Tensor, up: torch.Tensor, scale: float) -> Any:
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (down.to(x.device, x.dtype), up.to(x.device, x.dtype))
        d, u = cache[key]
        return output - scale * F.linear(F.linear(x, d), u).to(output.dtype)

    return hook


def _base_linear(module: Any) -> Any:
    """The Linear holding the base weight: the module itself, or peft's ``base_layer`` once LoRA wraps it."""
    module = getattr(module, "base_layer", module)
    return module if isinstance(module, nn.Linear) else None

