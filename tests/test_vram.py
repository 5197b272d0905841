"""The VRAM estimate: calibration points, monotonicity, parameter counts and architecture inference."""

import itertools
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from training.config import TrainingConfig
from training.errors import ConfigError
from training.vram import CALIBRATION, SPECS, estimate_vram, infer_arch, vram_line


def config(**kw) -> TrainingConfig:
    base = dict(resolution="512,512", train_batch_size=4, network_dim=64, optimizer_type="AdamW8bit",
                mixed_precision="bf16", network_train_unet_only=True, cache_latents=True)
    base.update(kw)
    return TrainingConfig(**base)


@pytest.mark.parametrize("point", CALIBRATION, ids=lambda p: f"{p.arch}-gc{int(p.gradient_checkpointing)}")
def test_calibration_points_within_15_percent(point):
    cfg = config(resolution=str(point.resolution), train_batch_size=point.batch, network_dim=point.dim,
                 optimizer_type=point.optimizer, gradient_checkpointing=point.gradient_checkpointing)
    estimate = estimate_vram(cfg, point.arch).total_gib
    assert abs(estimate - point.measured_gib) <= 0.15 * point.measured_gib


def test_sdxl_without_checkpointing_does_not_fit_a_16_gb_card_but_with_it_does():
    card = 16e9 / 1024 ** 3  # a "16 GB" card in GiB
    sdxl = dict(resolution="1024,1024", train_batch_size=1, network_dim=128)
    assert estimate_vram(config(**sdxl), "sdxl").total_gib > card
    assert estimate_vram(config(**sdxl, gradient_checkpointing=True), "sdxl").total_gib < card - 1


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_more_dim_batch_or_resolution_never_estimates_less(arch):
    dims, batches, sides = (8, 32, 64, 128, 256), (1, 2, 4, 8), (256, 512, 768, 1024)
    for gc, opt, te in itertools.product((False, True), ("AdamW", "AdamW8bit"), (False, True)):
        def total(dim, batch, side):
            cfg = config(network_dim=dim, train_batch_size=batch, resolution=str(side), gradient_checkpointing=gc,
                         optimizer_type=opt, network_train_unet_only=not te)
            return estimate_vram(cfg, arch).total_gib
        for dim, batch, side in itertools.product(dims, batches, sides):
            here = total(dim, batch, side)
            if dim != dims[-1]:
                assert total(dims[dims.index(dim) + 1], batch, side) > here
            if batch != batches[-1]:
                assert total(dim, batches[batches.index(batch) + 1], side) > here
            if side != sides[-1]:
                assert total(dim, batch, sides[sides.index(side) + 1]) > here


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_checkpointing_8bit_and_caching_never_estimate_more(arch):
    for dim, batch, side, te in itertools.product((16, 128), (1, 4), (512, 1024), (False, True)):
        kw = dict(network_dim=dim, train_batch_size=batch, resolution=str(side), network_train_unet_only=not te)
        plain = estimate_vram(config(**kw, optimizer_type="AdamW"), arch).total_gib
        assert estimate_vram(config(**kw, optimizer_type="AdamW", gradient_checkpointing=True), arch).total_gib < plain
        assert estimate_vram(config(**kw, optimizer_type="AdamW8bit"), arch).total_gib < plain
        assert estimate_vram(config(**kw, optimizer_type="AdamW", cache_latents=False), arch).total_gib > plain
        assert estimate_vram(config(**kw, optimizer_type="AdamW", mixed_precision="no"), arch).total_gib > plain


def test_parts_show_what_is_on_the_gpu():
    unet_only = estimate_vram(config(), "sd15").parts
    assert unet_only["text_encoders"] == 0 and unet_only["vae"] == 0
    full = estimate_vram(config(network_train_unet_only=False, cache_latents=False), "sdxl").parts
    # both SDXL encoders in bf16 (about 0.82 billion parameters) and the VAE
    assert 1.4 < full["text_encoders"] < 1.7 and 0.1 < full["vae"] < 0.2
    assert full["lora"] > estimate_vram(config(), "sdxl").parts["lora"]


def test_vram_line_names_the_settings():
    line = vram_line(config(), "sd15")
    assert line == ("VRAM estimate: 7.1 GiB (sd15, 512x512, batch 4, dim 64, AdamW8bit, "
                    "no gradient checkpointing)")
    guessed = vram_line(config(pretrained_model_name_or_path="missing.ckpt", gradient_checkpointing=True,
                               network_train_unet_only=False))
    assert re.match(r"VRAM estimate: \d+\.\d GiB \(sd15 assumed, 512x512, .*, gradient checkpointing, "
                    r"text encoder trained\)$", guessed)


def test_unknown_arch_is_one_clear_error():
    with pytest.raises(ConfigError, match="architecture 'flux'.*sd15, sdxl, sd3, zimage"):
        estimate_vram(config(), "flux")


# --------------------------------------------------------------------------- architecture inference


def _tiny_safetensors(path, keys):
    save_file({key: torch.zeros(1) for key in keys}, str(path))
    return str(path)


def test_arch_from_safetensors_tensor_names(tmp_path):
    sdxl = _tiny_safetensors(tmp_path / "xl.safetensors", [
        "model.diffusion_model.input_blocks.0.0.weight",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"])
    sd15 = _tiny_safetensors(tmp_path / "v15.safetensors", [
        "model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"])
    diffusers_xl_unet = _tiny_safetensors(tmp_path / "unet.safetensors", ["add_embedding.linear_1.weight",
                                                                          "down_blocks.0.resnets.0.conv1.weight"])
    assert (infer_arch(sdxl), infer_arch(sd15), infer_arch(diffusers_xl_unet)) == ("sdxl", "sd15", "sdxl")
    est = estimate_vram(config(pretrained_model_name_or_path=sdxl, resolution=None))
    assert est.arch == "sdxl" and est.arch_inferred
    assert est.total_gib == estimate_vram(config(resolution="1024,1024"), "sdxl").total_gib
    assert vram_line(config(pretrained_model_name_or_path=sdxl)).startswith("VRAM estimate: ")
    assert "(sdxl, 512x512" in vram_line(config(pretrained_model_name_or_path=sdxl))


def test_arch_from_diffusers_folder_and_fallbacks(tmp_path):
    for name, pipeline in (("xl", "StableDiffusionXLPipeline"), ("v15", "StableDiffusionPipeline")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    (tmp_path / "xl_unet" / "unet").mkdir(parents=True)
    (tmp_path / "xl_unet" / "unet" / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time"}))
    assert [infer_arch(str(tmp_path / n)) for n in ("xl", "v15", "xl_unet")] == ["sdxl", "sd15", "sdxl"]
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 4)
    (tmp_path / "model.ckpt").write_bytes(b"not read")
    for unknown in (tmp_path / "broken.safetensors", tmp_path / "model.ckpt", tmp_path / "missing", ""):
        assert infer_arch(str(unknown)) == "sd15"
    assert not estimate_vram(config(pretrained_model_name_or_path=str(tmp_path / "model.ckpt"))).arch_inferred


# --------------------------------------------------------------------------- the parameter counts


def _lora_params_per_rank(model, containers) -> int:
    from training.network import target_module_names

    modules = dict(model.named_modules())
    total = 0
    for name in target_module_names(model, containers):
        m = modules[name]
        total += (m.in_features + m.out_features) if isinstance(m, torch.nn.Linear) else (m.in_channels + m.out_channels)
    return total


@pytest.mark.parametrize("kind,arch", [("sd1", "sd15"), ("sdxl", "sdxl")])
def test_parameter_counts_match_the_real_modules(kind, arch):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from training.models import _pipeline_layout  # the published configs the trainer loads with

    layout = _pipeline_layout(kind)
    spec = SPECS[arch]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(layout["unet/config.json"])
        vae = AutoencoderKL.from_config(layout["vae/config.json"])
        encoders = [CLIPTextModel(CLIPTextConfig.from_dict(layout["text_encoder/config.json"]))]
        if kind == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_dict(layout["text_encoder_2/config.json"])))
    assert sum(p.numel() for p in unet.parameters()) == spec.unet_params
    assert sum(p.numel() for p in vae.parameters()) == spec.vae_params
    assert _lora_params_per_rank(unet, ("Transformer2DModel",)) == spec.unet_lora_per_rank
    for encoder, (params, per_rank, _, _) in zip(encoders, spec.text_encoders, strict=True):
        assert _lora_params_per_rank(encoder, ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")) == per_rank
        # the text model's parameters; the position ids buffer and token embeddings count as in the release
        assert abs(sum(p.numel() for p in encoder.parameters()) - params) / params < 0.01
