"""Tiny SD models for tests: the builders of :mod:`training.tiny`, plus writers of the original
(LDM/SGM) single-file layout so tests can load a single ``.safetensors`` checkpoint through the real loader.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.tiny import (  # noqa: F401  (re-exported for tests)
    TEXT_DIM, TEXT_DIM_2, build_tiny_sd15, build_tiny_sdxl, save_tiny_sd15, save_tiny_sdxl, tiny_scheduler,
    tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae, write_tokenizer_files,
)


# --- the original (LDM) single-file layout ---------------------------------------------------------------

_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_block_prefixes(config) -> dict[str, str]:
    """diffusers UNet module prefix -> original (LDM) prefix, for any block count and layers per block."""
    layers = config.layers_per_block
    m = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
         "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
         "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
         "mid_block.attentions.0.": "middle_block.1."}
    for j in range(2):
        m[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    for i in range(len(config.block_out_channels)):
        for j in range(layers):
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{1 + i * (layers + 1) + j}.0."
            m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{1 + i * (layers + 1) + j}.1."
        m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (layers + 1)}.0.op."
        has_attention = "CrossAttn" in config.up_block_types[i]
        for j in range(layers + 1):
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (layers + 1) + j}.0."
            m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (layers + 1) + j}.1."
        m[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * (layers + 1) + layers}.{2 if has_attention else 1}."
    return m


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """A diffusers UNet's weights under the original checkpoint's ``model.diffusion_model.`` names."""
    prefixes = sorted(_unet_block_prefixes(unet.config).items(), key=lambda kv: -len(kv[0]))
    out = {}
    for key, tensor in unet.state_dict().items():
        src, dst = next((s, d) for s, d in prefixes if key.startswith(s))
        rest = key[len(src):]
        if ".resnets." in src or src.startswith("mid_block.resnets"):
            name, _, leaf = rest.partition(".")
            rest = f"{_RESNET_LDM[name]}.{leaf}"
        out["model.diffusion_model." + dst + rest] = tensor
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """A diffusers VAE's weights under the original ``first_stage_model.`` names."""
    blocks = len(vae.config.block_out_channels)
    out = {}
    for key, tensor in vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for part in ("encoder", "decoder"):
            new = new.replace(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.")
            new = new.replace(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.")
            if f"{part}.mid_block.attentions.0." in new:
                new = new.replace(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")
                for src, dst in _VAE_ATTN.items():
                    new = new.replace(f"attn_1.{src}.", f"attn_1.{dst}.")
                if tensor.ndim == 2:  # the original attention uses 1x1 convolutions
                    tensor = tensor[:, :, None, None]
        for i in range(blocks):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{blocks - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.")
        out["first_stage_model." + new] = tensor
    return out


def save_tiny_sd15_single_file(path: str | Path, pipe=None) -> Path:
    """Save a tiny SD 1.x pipeline as one original-layout ``.safetensors`` file."""
    from safetensors.torch import save_file

    path = Path(path)
    pipe = pipe or build_tiny_sd15(path.parent / f".{path.stem}_tokenizer")
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    for key, tensor in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + key] = tensor
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def open_clip_text_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection``'s weights in open_clip's layout (SDXL's second text encoder)."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {prefix + "text_projection": state.pop("text_projection.weight").T.contiguous(),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight")}
    for kind in ("weight", "bias"):
        out[prefix + f"ln_final.{kind}"] = state.pop(f"final_layer_norm.{kind}")
    for layer in range(text_encoder.config.num_hidden_layers):
        src, dst = f"encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            qkv = [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{b}.{kind}"] = state.pop(f"{src}{a}.{kind}")
    state.pop("embeddings.position_ids", None)
    assert not state, f"unconverted text encoder weights: {sorted(state)}"
    return out


def save_tiny_sdxl_single_file(path: str | Path, pipe=None) -> Path:
    """Save a tiny SDXL pipeline as one original-layout (SGM) ``.safetensors`` file."""
    from safetensors.torch import save_file

    path = Path(path)
    pipe = pipe or build_tiny_sdxl(path.parent / f".{path.stem}_tokenizer")
    state = {**unet_to_ldm(pipe.unet), **vae_to_ldm(pipe.vae)}
    for key, tensor in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        state["conditioner.embedders.0.transformer." + key] = tensor
    state.update(open_clip_text_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def copy_without_tokenizer_length(folder: str | Path, target: str | Path) -> Path:
    """A copy of a diffusers folder whose tokenizer configs lack ``model_max_length`` (as some
    community conversions ship them); returns ``target``."""
    import json
    import shutil

    target = Path(shutil.copytree(folder, target))
    for config in target.glob("tokenizer*/tokenizer_config.json"):
        values = json.loads(config.read_text(encoding="utf-8"))
        values.pop("model_max_length", None)
        config.write_text(json.dumps(values), encoding="utf-8")
    return target
