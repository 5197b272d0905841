"""VRAM estimates for SD3.5 Large and Z-Image: sizes recounted from the real modules, published recipes.

Recipes: sd-scripts' README says SD3.5 Large LoRA trains on 16 GB with ``fp8_base``, cached text-encoder
outputs, gradient checkpointing, AdamW8bit, dim 4, bf16; ai-toolkit's Z-Image Turbo preset trains on
12 GB with an 8-bit transformer, cached latents and images up to 768 px.
"""

import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

from training.config import TrainingConfig
from training.dit import SD3Family, ZImageFamily
from training.families import DIT_SIZES
from training.vram import estimate_vram, infer_arch, vram_line

CARD_16, CARD_12 = 16e9 / 1024 ** 3, 12e9 / 1024 ** 3


def config(**kw) -> TrainingConfig:
    base = dict(resolution="1024", train_batch_size=1, network_dim=4, optimizer_type="AdamW8bit",
                mixed_precision="bf16", network_train_unet_only=True, cache_latents=True, gradient_checkpointing=True)
    base.update(kw)
    return TrainingConfig(**base)


def test_sd35_large_fits_16_gb_with_fp8_base_and_not_without():
    with_fp8 = estimate_vram(config(fp8_base=True), "sd3")
    without = estimate_vram(config(), "sd3")
    assert with_fp8.total_gib < CARD_16 - 1 < CARD_16 < without.total_gib
    # fp8 stores each of the 8.06 billion transformer weights in one byte instead of two
    assert (without.parts["transformer"] - with_fp8.parts["transformer"]) * 1024 ** 3 == DIT_SIZES["sd3"].transformer_params


def test_z_image_turbo_recipe_fits_12_gb_and_full_precision_without_checkpointing_does_not_fit_16():
    turbo = config(fp8_base=True, resolution="768", network_dim=32)
    assert estimate_vram(turbo, "zimage").total_gib < CARD_12 - 1
    heavy = config(resolution="1024", network_dim=32, gradient_checkpointing=False, optimizer_type="AdamW")
    assert estimate_vram(heavy, "zimage").total_gib > CARD_16


@pytest.mark.parametrize("arch", ["sd3", "zimage"])
def test_more_dim_batch_or_resolution_never_estimates_less_and_savings_always_save(arch):
    for gc, fp8 in itertools.product((False, True), (False, True)):
        def total(**kw):
            return estimate_vram(config(gradient_checkpointing=gc, fp8_base=fp8, **kw), arch).total_gib
        assert total(network_dim=4) < total(network_dim=32) < total(network_dim=64)
        assert total(train_batch_size=1) < total(train_batch_size=2) < total(train_batch_size=4)
        assert total(resolution="512") < total(resolution="768") < total(resolution="1024")
    for kw in (dict(), dict(resolution="512", train_batch_size=4)):
        plain = estimate_vram(config(gradient_checkpointing=False, **kw), arch).total_gib
        assert estimate_vram(config(**kw), arch).total_gib < plain
        assert estimate_vram(config(gradient_checkpointing=False, fp8_base_unet=True, **kw), arch).total_gib < plain


def test_vram_line_names_the_family_and_says_the_dit_figures_are_not_measured(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    line = vram_line(config(pretrained_model_name_or_path=str(tmp_path), fp8_base=True, network_train_unet_only=False))
    assert line.startswith("VRAM estimate: ") and "(zimage, 1024x1024" in line
    assert "fp8 base" in line and "activations counted, not measured" in line
    assert "text encoder trained" not in line  # Z-Image's Qwen3 is never trained


def test_arch_from_dit_folders_and_files(tmp_path):
    for name, pipeline in (("sd3", "StableDiffusion3Pipeline"), ("zimage", "ZImagePipeline")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
        assert infer_arch(str(tmp_path / name)) == name
    files = {"sd3": ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
                     "model.diffusion_model.x_embedder.proj.weight"],
             "zimage": ["model.diffusion_model.noise_refiner.0.attention.qkv.weight",
                        "model.diffusion_model.layers.0.attention.out.weight"]}
    for arch, keys in files.items():
        path = tmp_path / f"{arch}.safetensors"
        save_file({key: torch.zeros(1) for key in keys}, str(path))
        assert infer_arch(str(path)) == arch


@pytest.mark.parametrize("name", ["sd3", "zimage"])
def test_dit_sizes_match_the_published_configs(name):
    from diffusers import AutoencoderKL, SD3Transformer2DModel, ZImageTransformer2DModel

    with torch.device("meta"):
        if name == "sd3":  # SD3.5 Large
            model = SD3Transformer2DModel(sample_size=128, num_layers=38, attention_head_dim=64, num_attention_heads=38,
                                          joint_attention_dim=4096, caption_projection_dim=2432,
                                          pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm")
        else:  # the diffusers defaults are Z-Image's
            model = ZImageTransformer2DModel()
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    fam = SD3Family() if name == "sd3" else ZImageFamily()
    sizes = DIT_SIZES[fam.vram_arch]
    modules = dict(model.named_modules())

    def per_rank(paths):
        return sum(modules[p].in_features + modules[p].out_features for p in paths)

    assert sum(p.numel() for p in model.parameters()) == sizes.transformer_params
    assert sum(p.numel() for p in vae.parameters()) == sizes.vae_params
    assert per_rank(fam.lora_targets(model)) == sizes.lora_params_per_rank
    assert per_rank(fam.lora_targets(model, attention_only=True)) == sizes.attention_lora_params_per_rank
    width = model.config.caption_projection_dim if name == "sd3" else model.config.dim
    layers = model.config.num_layers if name == "sd3" else model.config.n_layers + model.config.n_refiner_layers
    assert (sizes.width, sizes.layers) == (width, layers)
