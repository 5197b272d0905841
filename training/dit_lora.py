"""LoRA on a DiT transformer (SD3/SD3.5, Z-Image), built with peft and saved in the family's file format.

Targets come from the family (:meth:`training.dit.DitFamily.lora_targets`): every Linear inside the
transformer blocks by default, or only their attention projections (``attention_only``, what diffusers'
DreamBooth LoRA scripts train). The update is ``up(dropout(down(x))) * alpha / dim`` as in
:class:`training.network.LoraNetwork`: peft's ``lora_alpha / r`` scaling, kohya's ``network_dropout`` on
the down projection's output. LoRA weights stay float32 whatever the base weights' dtype (peft creates
them in the base layer's dtype, which for an fp8-stored base would be fp8).

Two ways out: :meth:`DitLora.state_dict` holds the raw weights under module paths (for an exact
training state), :meth:`DitLora.save` writes the file every loader reads (see :mod:`training.dit`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from training.dit import DitFamily
from training.errors import LoraSearchError
from training.network import ADAPTER, read_lora_file, write_lora_file


class DitLora:
    """LoRA adapters on the blocks of one DiT transformer."""

    def __init__(self, transformer: nn.Module, family: DitFamily, dim: int, alpha: Optional[float],
                 dropout: Optional[float] = None, attention_only: bool = False):
        self.transformer = transformer
        self.family = family
        self.dim = int(dim)
        self.alpha = float(alpha) if alpha else float(dim)  # kohya: alpha missing or 0 means alpha = dim
        self.dropout = float(dropout or 0.0)
        self.targets = family.lora_targets(transformer, attention_only)
        if not self.targets:
            raise LoraSearchError(f"no LoRA target modules found in the {family.name} transformer; "
                                  f"is it a {family.pipeline_class} model?")
        self._inject()

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    def _inject(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=self.dim, lora_alpha=self.alpha, target_modules=self.targets, lora_dropout=0.0,
                            init_lora_weights=True)
        inject_adapter_in_model(config, self.transformer, adapter_name=ADAPTER)
        for name, param in self.transformer.named_parameters():
            param.requires_grad_("lora_" in name)
        for layer in self.layers().values():
            for sub in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
                sub.float()
            if self.dropout > 0:
                layer.lora_A[ADAPTER].register_forward_hook(self._dropout_hook)

    def _dropout_hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, p=self.dropout, training=module.training)

    def layers(self) -> dict[str, nn.Module]:
        """The peft LoRA layers by module path, in target order."""
        modules = dict(self.transformer.named_modules())
        return {path: modules[path] for path in self.targets}

    def parameters(self) -> list[nn.Parameter]:
        """The trainable LoRA parameters, in a stable order."""
        return [p for layer in self.layers().values()
                for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``module path -> (down, up)`` weights (views of the live parameters)."""
        return {path: (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
                for path, layer in self.layers().items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Raw LoRA weights (``<path>.lora_down.weight``/``.lora_up.weight``) for a training state."""
        out = {}
        for path, (down, up) in self.pairs().items():
            out[f"{path}.lora_down.weight"] = down.detach().clone()
            out[f"{path}.lora_up.weight"] = up.detach().clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "training state") -> None:
        """Copy weights saved by :meth:`state_dict` back, exactly; every module must be present and match."""
        self._check_coverage({k.rsplit(".lora_", 1)[0] for k in state}, source)
        with torch.no_grad():
            for path, (down, up) in self.pairs().items():
                self._copy(down, state[f"{path}.lora_down.weight"], f"{source}: {path}.lora_down")
                self._copy(up, state[f"{path}.lora_up.weight"], f"{source}: {path}.lora_up")

    def file_state_dict(self, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """The tensors of the LoRA file, in the family's key format."""
        pairs = {path: (down.detach().float(), up.detach().float()) for path, (down, up) in self.pairs().items()}
        tensors = self.family.file_state_dict(pairs, self.alpha, self.dim)
        return {key: tensor.to(dtype or torch.float32).clone() for key, tensor in tensors.items()}

    def save(self, path: str | Path, metadata: dict[str, str], dtype: Optional[torch.dtype] = None) -> Path:
        """Write the LoRA ``.safetensors`` file atomically, with kohya's ``ss_*`` metadata and hashes."""
        return write_lora_file(path, self.file_state_dict(dtype), metadata)

    def load(self, path: str | Path) -> None:
        """Load a LoRA file in this family's format (``network_weights``), at the strength it was saved with."""
        tensors = read_lora_file(path)
        entries = self.family.read_file_state_dict(tensors)
        self._check_coverage(set(entries), str(path))
        with torch.no_grad():
            for module, (down, up) in self.pairs().items():
                file_down, file_up, file_scale = entries[module]
                self._copy(down, file_down, f"{path}: {module}.lora_A")
                self._copy(up, file_up.float() * (file_scale / self.scale), f"{path}: {module}.lora_B")

    def _check_coverage(self, found: set[str], source: str) -> None:
        missing = sorted(set(self.targets) - found)
        unexpected = sorted(found - set(self.targets))
        if missing or unexpected:
            raise LoraSearchError(f"{source} does not match this network ({len(missing)} modules missing, "
                                  f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[0]}); "
                                  "use a LoRA trained for this base model and network settings")

    @staticmethod
    def _copy(target: torch.Tensor, tensor: torch.Tensor, what: str) -> None:
        if tensor.shape != target.shape:
            raise LoraSearchError(f"{what} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}; "
                                  "check network_dim")
        target.copy_(tensor.to(target.dtype))

