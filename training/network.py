"""The kohya LoRA network built with peft, and its kohya-format file (``lora_unet_*``, ``lora_te*_``).

Targets are kohya's defaults: every ``nn.Linear`` and 1x1 ``nn.Conv2d`` inside the UNet's
``Transformer2DModel`` blocks, and the linears of the text encoders' ``CLIPAttention``/``CLIPMLP``.
The update is ``up(dropout(down(x))) * alpha / dim``: peft's ``lora_alpha/r`` scaling, with kohya's
``network_dropout`` applied to the down projection's output (peft's own dropout acts on the input).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from training.atomic import atomic_write_with
from training.errors import LoraSearchError

ADAPTER = "default"
_UNET_CONTAINERS = ("Transformer2DModel",)
_TE_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


def _is_target(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def target_module_names(model: nn.Module, containers: Iterable[str]) -> list[str]:
    """Full names of the Linear / 1x1 Conv2d modules inside modules whose class is in ``containers``."""
    containers = tuple(containers)
    names = []
    for name, module in model.named_modules():
        if type(module).__name__ not in containers:
            continue
        for child_name, child in module.named_modules():
            if child_name and _is_target(child):
                names.append(f"{name}.{child_name}" if name else child_name)
    return sorted(set(names))


@dataclass
class LoraPart:
    """One trained model that carries LoRA layers, with its kohya name prefix."""

    prefix: str  # lora_unet, lora_te, lora_te1, lora_te2
    model: nn.Module


class LoraNetwork:
    """LoRA adapters on a UNet and its text encoder(s), saved and loaded in kohya's format."""

    def __init__(self, unet: nn.Module, text_encoders: list, dim: int, alpha: float,
                 dropout: Optional[float] = None, train_unet: bool = True, train_text_encoder: bool = True,
                 sgm_names: bool = False):
        self.dim = int(dim)
        # kohya: alpha missing or 0 means alpha = dim (scale 1).
        self.alpha = float(alpha) if alpha else float(dim)
        self.dropout = float(dropout or 0.0)
        te_prefixes = ["lora_te"] if len(text_encoders) == 1 else ["lora_te1", "lora_te2"]
        # Only trained models get LoRA layers, so the file holds only what was trained (as sd-scripts saves).
        self.parts = [LoraPart("lora_unet", unet)] if train_unet else []
        if train_text_encoder:
            self.parts += [LoraPart(p, te) for p, te in zip(te_prefixes, text_encoders)]
        for model in (unet, *text_encoders):
            model.requires_grad_(False)
        self._sgm_layers = unet.config.layers_per_block if sgm_names else None
        for part in self.parts:
            self._inject(part)
        self._names = self._kohya_name_map()

    @property
    def scale(self) -> float:
        return self.alpha / self.dim

    def _inject(self, part: LoraPart) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        containers = _UNET_CONTAINERS if part.prefix == "lora_unet" else _TE_CONTAINERS
        targets = target_module_names(part.model, containers)
        if not targets:
            raise LoraSearchError(f"no LoRA target modules found in the {part.prefix} model; is it a Stable Diffusion model?")
        config = LoraConfig(r=self.dim, lora_alpha=self.alpha, target_modules=targets, lora_dropout=0.0,
                            init_lora_weights=True)
        inject_adapter_in_model(config, part.model, adapter_name=ADAPTER)
        for name, param in part.model.named_parameters():
            param.requires_grad_("lora_" in name)
        for module in self._lora_layers(part.model):
            # Autocast (or equal dtypes without it) already matches the input to the LoRA weights; peft's own
            # cast would copy every input to float32 and back, an extra pass over each activation.
            module.cast_input_dtype_enabled = False
        if self.dropout > 0:
            for module in self._lora_layers(part.model):
                module.lora_A[ADAPTER].register_forward_hook(self._dropout_hook)

    def _dropout_hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, p=self.dropout, training=module.training)

    @staticmethod
    def _lora_layers(model: nn.Module) -> list[nn.Module]:
        from peft.tuners.lora import LoraLayer

        return [m for m in model.modules() if isinstance(m, LoraLayer)]

    def scale_as_tensors(self, device: torch.device) -> None:
        """Hold each layer's ``alpha / dim`` as a 0-dim tensor on ``device`` instead of a Python float.

        Compiled code bakes a float into its kernels, so every alpha would compile anew; a tensor is an
        input, and runs that differ only in alpha share their compiled (and cached) kernels.
        """
        import torch._dynamo

        for part in self.parts:
            for layer in self._lora_layers(part.model):
                scale = torch.tensor(float(layer.scaling[ADAPTER]), device=device)
                torch._dynamo.mark_static_address(scale)  # fixed address: CUDA graphs read it in place
                layer.scaling[ADAPTER] = scale

    def module_counts(self) -> dict[str, int]:
        """Number of LoRA modules per kohya prefix (kohya logs 72 + 192 for SD 1.5)."""
        return {p.prefix: len(self._lora_layers(p.model)) for p in self.parts}

    def trainable_parameters(self, prefixes: Iterable[str]) -> list[nn.Parameter]:
        """LoRA parameters of the parts whose prefix is in ``prefixes``, in a stable order."""
        wanted = set(prefixes)
        return [param for part in self.parts if part.prefix in wanted
                for name, param in part.model.named_parameters() if "lora_" in name]

    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict]:
        """Optimizer parameter groups: the UNet LoRA and the text-encoder LoRA with their own lr."""
        groups = []
        unet = self.trainable_parameters(["lora_unet"])
        te = self.trainable_parameters(["lora_te", "lora_te1", "lora_te2"])
        if unet:
            groups.append({"params": unet, "lr": unet_lr})
        if te:
            groups.append({"params": te, "lr": text_encoder_lr})
        return groups

    # --- kohya names ---------------------------------------------------------------------------------

    def _kohya_name_map(self) -> dict[str, tuple[LoraPart, str]]:
        """kohya module name -> (part, module path in the model)."""
        mapping = {}
        for part in self.parts:
            for name, module in part.model.named_modules():
                if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {}):
                    path = name
                    if part.prefix == "lora_unet" and self._sgm_layers is not None:
                        path = diffusers_to_sgm_name(name, self._sgm_layers)
                    elif part.prefix != "lora_unet" and not name.startswith("text_model."):
                        # transformers 5 dropped the CLIPTextModel.text_model wrapper; kohya names keep it.
                        path = "text_model." + name
                    mapping[f"{part.prefix}_{path.replace('.', '_')}"] = (part, name)
        return mapping

    def kohya_state_dict(self, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
        """LoRA weights under kohya names: ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``."""
        out = {}
        modules = {}
        for part in self.parts:
            modules[part.prefix] = dict(part.model.named_modules())
        for kohya, (part, path) in self._names.items():
            layer = modules[part.prefix][path]
            down = layer.lora_A[ADAPTER].weight.detach()
            up = layer.lora_B[ADAPTER].weight.detach()
            out[f"{kohya}.lora_down.weight"] = _cast(down, dtype)
            out[f"{kohya}.lora_up.weight"] = _cast(up, dtype)
            out[f"{kohya}.alpha"] = torch.tensor(self.alpha, dtype=dtype or torch.float32)
        return out

    def load_kohya_state_dict(self, state: dict[str, torch.Tensor], source: str = "LoRA file") -> None:
        """Copy kohya-named LoRA weights into the network; every module must be present and match.

        Modules of a model this network does not train (a full LoRA as the start of a text-encoder-only
        run) are skipped, as sd-scripts skips them.
        """
        modules = {part.prefix: dict(part.model.named_modules()) for part in self.parts}
        missing = [k for k in self._names if f"{k}.lora_down.weight" not in state]
        ours = tuple(f"{part.prefix}_" for part in self.parts)
        unexpected = sorted({k.split(".")[0] for k in state if k.startswith(ours)} - set(self._names))
        if missing or unexpected:
            raise LoraSearchError(f"{source} does not match this network ({len(missing)} modules missing, "
                                  f"{len(unexpected)} unexpected, e.g. {(missing + unexpected)[0]}); "
                                  "use a LoRA trained for this base model and network settings")
        with torch.no_grad():
            for kohya, (part, path) in self._names.items():
                layer = modules[part.prefix][path]
                for suffix, target in (("lora_down", layer.lora_A[ADAPTER]), ("lora_up", layer.lora_B[ADAPTER])):
                    tensor = state[f"{kohya}.{suffix}.weight"]
                    if tensor.shape != target.weight.shape:
                        raise LoraSearchError(f"{source}: {kohya}.{suffix} has shape {tuple(tensor.shape)}, "
                                              f"expected {tuple(target.weight.shape)}; check network_dim")
                    target.weight.copy_(tensor.to(target.weight.dtype))

    def save(self, path: str | Path, metadata: dict[str, str], dtype: Optional[torch.dtype] = None) -> Path:
        """Write the kohya-format ``.safetensors`` file atomically."""
        return write_lora_file(path, self.kohya_state_dict(dtype), metadata)

    def load(self, path: str | Path) -> None:
        """Load a kohya-format LoRA file into the network (``network_weights``)."""
        self.load_kohya_state_dict(read_lora_file(path), str(path))


def write_lora_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write LoRA tensors as ``.safetensors`` atomically, with ``metadata`` and kohya's model hashes."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    metadata = {**metadata, **model_hashes(tensors, metadata)}
    return atomic_write_with(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_lora_file(path: str | Path, key: str = "network_weights") -> dict[str, torch.Tensor]:
    """The tensors of the LoRA file the config's ``key`` names; a missing or torn file is one clear error."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LoraSearchError(f"{key} {path}: no such file; check the path")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a torn file
        raise LoraSearchError(f"{key} {path}: not a readable safetensors file ({exc}); check it") from None


def model_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """kohya's ``sshs_model_hash`` (SHA-256 of the tensor bytes) and ``sshs_legacy_hash``."""
    import hashlib

    from safetensors.torch import save

    blob = save(tensors, metadata)
    header = int.from_bytes(blob[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(blob[8 + header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]}


def _cast(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None else tensor.clone()


_DOWN = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)\.")
_UP = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)\.")


def diffusers_to_sgm_name(name: str, layers_per_block: int) -> str:
    """A diffusers UNet attention path in SDXL's original (SGM) block numbering, as kohya names it.

    With L = ``layers_per_block``: ``down_blocks.i.attentions.j`` -> ``input_blocks.{1 + i*(L+1) + j}.1``
    (each down block is L layers plus a downsampler), ``up_blocks.i.attentions.j`` ->
    ``output_blocks.{i*(L+1) + j}.1`` (L+1 layers each), ``mid_block.attentions.0`` -> ``middle_block.1``.
    """
    if m := _DOWN.match(name):
        i, j = int(m[1]), int(m[2])
        return f"input_blocks.{1 + i * (layers_per_block + 1) + j}.1." + name[m.end():]
    if m := _UP.match(name):
        i, j = int(m[1]), int(m[2])
        return f"output_blocks.{i * (layers_per_block + 1) + j}.1." + name[m.end():]
    if name.startswith("mid_block.attentions.0."):
        return "middle_block.1." + name[len("mid_block.attentions.0."):]
    return name


def save_dtype(save_precision: Optional[str]) -> Optional[torch.dtype]:
    """The tensor dtype for kohya's ``save_precision`` (``None`` keeps float32)."""
    return {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[save_precision]
