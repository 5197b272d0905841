"""The LoRA network, its kohya file format, model loading, optimizers and schedulers."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import tiny_models
from helpers import lr_curve
from training.errors import ConfigError, LoraSearchError


def _pipeline(folder: Path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(folder, local_files_only=True)


def _randomize(network, seed: int = 0) -> None:
    """Give every LoRA weight (ups included) non-zero values so the LoRA visibly changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in network.trainable_parameters(["lora_unet", "lora_te", "lora_te1", "lora_te2"]):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def _lora_network(pipe, **kwargs):
    from training.network import LoraNetwork

    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    return LoraNetwork(pipe.unet, encoders, dim=4, alpha=2.0, sgm_names=hasattr(pipe, "text_encoder_2"), **kwargs)


def _unet_out(pipe, sdxl: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    width = pipe.unet.config.cross_attention_dim
    hidden = torch.randn(2, 77, width, generator=gen)
    added = None
    if sdxl:
        added = {"text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 500]), hidden, added_cond_kwargs=added).sample


def _te_out(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(["ohwx, a red cat"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_kohya_names_counts_and_alpha(tiny_sd15_dir):
    pipe = _pipeline(tiny_sd15_dir)
    net = _lora_network(pipe)
    # 4 Transformer2DModels x 12 targets (proj_in/out, 4+4 attention, 2 feed-forward); 2 CLIP layers x 6
    assert net.module_counts() == {"lora_unet": 48, "lora_te": 12}
    state = net.kohya_state_dict()
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_up.weight" in state
    assert "lora_unet_mid_block_attentions_0_proj_in.alpha" in state
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in state
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in state
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in state)
    assert len(state) == 3 * 60
    alpha = state["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"]
    assert alpha.ndim == 0 and alpha.item() == 2.0
    # kohya init: up weights zero, so a fresh LoRA changes nothing
    assert all(v.abs().sum() == 0 for k, v in state.items() if k.endswith("lora_up.weight"))
    assert any(v.abs().sum() > 0 for k, v in state.items() if k.endswith("lora_down.weight"))


def test_saved_file_loads_in_diffusers_with_equal_outputs(tiny_sd15_dir, tmp_path, caplog):
    pipe = _pipeline(tiny_sd15_dir)
    base_unet = _unet_out(pipe)
    net = _lora_network(pipe)
    _randomize(net)
    pipe.unet.eval(), pipe.text_encoder.eval()
    ours_unet, ours_te = _unet_out(pipe), _te_out(pipe)
    path = net.save(tmp_path / "lora.safetensors", {"ss_network_dim": "4"})

    other = _pipeline(tiny_sd15_dir)
    with caplog.at_level(logging.WARNING):
        other.load_lora_weights(str(path))
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower() or "missing" in r.getMessage().lower()]
    loaded = [m for m in other.unet.modules() if hasattr(m, "lora_A")]
    assert len(loaded) == 48
    assert not torch.allclose(base_unet, ours_unet)
    torch.testing.assert_close(_unet_out(other), ours_unet, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_te_out(other), ours_te, rtol=1e-5, atol=1e-6)


def test_sdxl_file_uses_sgm_names_and_loads_in_diffusers(tiny_sdxl_dir, tmp_path):
    pipe = _pipeline(tiny_sdxl_dir)
    net = _lora_network(pipe)
    _randomize(net, seed=1)
    pipe.unet.eval()
    ours = _unet_out(pipe, sdxl=True)
    names = {k.split(".")[0] for k in net.kohya_state_dict()}
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in names  # down_blocks.1.attentions.0
    assert "lora_unet_output_blocks_0_1_proj_out" in names  # up_blocks.0.attentions.0
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k" in names
    assert any(n.startswith("lora_te1_text_model_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    path = net.save(tmp_path / "xl.safetensors", {})
    other = _pipeline(tiny_sdxl_dir)
    other.load_lora_weights(str(path))
    torch.testing.assert_close(_unet_out(other, sdxl=True), ours, rtol=1e-5, atol=1e-6)


def test_sgm_names_for_the_real_sdxl_layout():
    from training.network import diffusers_to_sgm_name

    assert diffusers_to_sgm_name("down_blocks.1.attentions.0.proj_in", 2) == "input_blocks.4.1.proj_in"
    assert diffusers_to_sgm_name("down_blocks.2.attentions.1.proj_in", 2) == "input_blocks.8.1.proj_in"
    assert diffusers_to_sgm_name("up_blocks.0.attentions.2.proj_out", 2) == "output_blocks.2.1.proj_out"
    assert diffusers_to_sgm_name("up_blocks.1.attentions.0.proj_out", 2) == "output_blocks.3.1.proj_out"
    assert diffusers_to_sgm_name("mid_block.attentions.0.proj_in", 2) == "middle_block.1.proj_in"


def test_network_dropout_acts_on_the_down_output_in_training_only(tiny_sd15_dir):
    pipe = _pipeline(tiny_sd15_dir)
    net = _lora_network(pipe, dropout=0.5)
    layer = next(m for m in pipe.text_encoder.modules() if hasattr(m, "lora_A"))
    seen = []
    layer.lora_B["default"].register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach()))
    ids = pipe.tokenizer(["a cat"], padding="max_length", return_tensors="pt").input_ids
    pipe.text_encoder.train()
    pipe.text_encoder(ids)
    zero_fraction = (seen[-1] == 0).float().mean().item()
    assert 0.3 < zero_fraction < 0.7
    pipe.text_encoder.eval()
    pipe.text_encoder(ids)
    assert (seen[-1] == 0).float().mean().item() < 0.05
    assert net.scale == 0.5


def test_load_rejects_a_lora_for_another_network(tiny_sd15_dir, tmp_path):
    from training.network import LoraNetwork

    pipe = _pipeline(tiny_sd15_dir)
    net = _lora_network(pipe)
    path = net.save(tmp_path / "a.safetensors", {})
    other = _pipeline(tiny_sd15_dir)
    unet_only = LoraNetwork(other.unet, [other.text_encoder], dim=4, alpha=2, train_text_encoder=False)
    unet_only_path = unet_only.save(tmp_path / "unet.safetensors", {})
    with pytest.raises(LoraSearchError, match="does not match .*lora_te_text_model"):
        _lora_network(_pipeline(tiny_sd15_dir)).load(unet_only_path)  # its text-encoder modules are missing
    fresh = _pipeline(tiny_sd15_dir)
    wrong_rank = LoraNetwork(fresh.unet, [fresh.text_encoder], dim=8, alpha=2)
    with pytest.raises(LoraSearchError, match="network_dim"):
        wrong_rank.load(path)


def test_a_full_lora_starts_a_one_part_network_with_its_part(tiny_sd15_dir, tmp_path):
    """As sd-scripts' ``network_weights``: the modules of the model that is not trained are skipped."""
    from safetensors.torch import load_file

    from training.network import LoraNetwork

    full = _lora_network(_pipeline(tiny_sd15_dir))
    _randomize(full)
    path = full.save(tmp_path / "full.safetensors", {})
    pipe = _pipeline(tiny_sd15_dir)
    te_only = LoraNetwork(pipe.unet, [pipe.text_encoder], dim=4, alpha=2.0, train_unet=False)
    te_only.load(path)
    saved = load_file(str(te_only.save(tmp_path / "te.safetensors", {})))
    assert saved.keys() == {k for k in load_file(str(path)) if k.startswith("lora_te_")}
    assert all(torch.equal(v, full.kohya_state_dict()[k]) for k, v in saved.items())
    assert not any(p.requires_grad for p in pipe.unet.parameters())  # the untrained UNet is frozen


# --- model loading -----------------------------------------------------------------------------------

def test_load_models_from_a_diffusers_folder(tiny_sd15_dir, make_config):
    from training.models import load_models

    models = load_models(make_config())
    assert not models.is_sdxl and models.base_model_version == "sd_v1"
    assert models.vae_scale_factor == 4 and len(models.text_encoders) == 1


def test_load_models_sdxl_folder_and_separate_vae(tiny_sdxl_dir, tiny_sd15_dir, make_config):
    from training.models import load_models

    models = load_models(make_config(pretrained_model_name_or_path=str(tiny_sdxl_dir), vae=str(tiny_sd15_dir)))
    assert models.is_sdxl and len(models.tokenizers) == 2 and models.base_model_version == "sdxl_base_v1-0"
    assert list(models.vae.config.block_out_channels) == [8, 16, 16]  # the separate (SD 1.x) VAE


def test_a_tokenizer_without_model_max_length_uses_the_text_encoders_77(tiny_sd15_dir, tmp_path, make_config):
    from training.models import encode_captions, load_models

    plain = load_models(make_config())
    bare_dir = tiny_models.copy_without_tokenizer_length(tiny_sd15_dir, tmp_path / "no-max-length")
    bare = load_models(make_config(pretrained_model_name_or_path=str(bare_dir)))
    assert bare.tokenizers[0].model_max_length == 77
    captions = ["ohwx, a red cat", "ohwx, " + ", ".join(["a long caption"] * 40)]
    for max_token_length in (None, 225):
        ours, _ = encode_captions(bare, captions, torch.device("cpu"), max_token_length=max_token_length)
        expected, _ = encode_captions(plain, captions, torch.device("cpu"), max_token_length=max_token_length)
        torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("kind", ["missing", "folder", "text", "keys"])
def test_bad_model_paths_give_one_line_errors(kind, tmp_path, make_config):
    from safetensors.torch import save_file

    from training.models import load_models

    path = tmp_path / "model.safetensors"
    if kind == "folder":
        path = tmp_path / "folder"
        path.mkdir()
    elif kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "keys":
        save_file({"some.weight": torch.zeros(2)}, str(path))
    with pytest.raises(LoraSearchError) as info:
        load_models(make_config(pretrained_model_name_or_path=str(path)))
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_single_file_config_folder_is_complete_and_offline():
    from transformers import CLIPTokenizer

    from training.models import single_file_config_dir

    folder = single_file_config_dir("sd1")
    assert (folder / "unet" / "config.json").is_file() and (folder / "vae" / "config.json").is_file()
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    # the real CLIP vocabulary: "a photo of a cat" is 5 word tokens between start and end
    ids = tok("a photo of a cat").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 7
    assert tok.convert_ids_to_tokens(ids[2]) == "photo</w>"


# --- optimizers and schedulers -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Lion", "Lion8bit", "SGDNesterov", "AdaFactor"])
def test_each_optimizer_name_trains(name, make_config):
    from training.optim import build_optimizer

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 80))
    cfg = make_config(optimizer_type=name, learning_rate=1e-2)
    opt = build_optimizer(cfg, [{"params": [weight], "lr": 1e-2}])
    before = weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (weight ** 2).sum().backward()
        opt.step()
    assert weight.detach().pow(2).sum() < before.pow(2).sum()


def test_optimizer_args_are_parsed_and_passed(make_config):
    from training.optim import build_optimizer, parse_optimizer_args

    assert parse_optimizer_args(["weight_decay=0.01", "betas=(0.9,0.99)", "mode=fast"]) == {
        "weight_decay": 0.01, "betas": (0.9, 0.99), "mode": "fast"}
    cfg = make_config(optimizer_args=["weight_decay=0.05", "betas=(0.8,0.9)"])
    opt = build_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}])
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(ConfigError, match="optimizer_args"):
        build_optimizer(make_config(optimizer_args=["no_such_arg=1"]), [{"params": [torch.nn.Parameter(torch.zeros(2))]}])


def test_prodigy_without_its_package_names_it(make_config):
    try:
        import prodigyopt  # noqa: F401
        pytest.skip("prodigyopt is installed")
    except ImportError:
        pass
    from training.optim import build_optimizer

    with pytest.raises(ConfigError, match="prodigyopt"):
        build_optimizer(make_config(optimizer_type="Prodigy"), [{"params": [torch.nn.Parameter(torch.zeros(2))]}])


def test_constant_runs_without_warmup(make_config):
    assert lr_curve(make_config(lr_scheduler="constant", lr_warmup_steps=0, learning_rate=1.0), 20) == [1.0] * 20


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"])
def test_each_scheduler_name_warms_up_then_follows_its_curve(name, make_config):
    lrs = lr_curve(make_config(lr_scheduler=name, lr_warmup_steps=4, learning_rate=1.0), 20)
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.5) and lrs[4] == pytest.approx(1.0)
    if name == "constant_with_warmup":
        assert lrs[-1] == pytest.approx(1.0)
    else:
        assert lrs[-1] < 0.2


def test_cosine_with_restarts_restarts_num_cycles_times(make_config):
    lrs = lr_curve(make_config(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2, learning_rate=1.0), 20)
    assert lrs[0] == pytest.approx(1.0) and lrs[9] < 0.1 and lrs[10] == pytest.approx(1.0) and lrs[19] < 0.1


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_load_models_from_a_single_original_layout_file(kind, tmp_path, make_config, monkeypatch):
    from training import models as models_module

    build, save = ((tiny_models.build_tiny_sd15, tiny_models.save_tiny_sd15_single_file) if kind == "sd1"
                   else (tiny_models.build_tiny_sdxl, tiny_models.save_tiny_sdxl_single_file))
    pipe = build(tmp_path / "tok")
    pipe.save_pretrained(tmp_path / "configs")  # stands in for the shipped configs, at tiny size
    checkpoint = save(tmp_path / "tiny.safetensors", pipe)
    assert models_module.detect_checkpoint_kind(checkpoint) == kind
    monkeypatch.setattr(models_module, "single_file_config_dir", lambda k: tmp_path / "configs")
    loaded = models_module.load_models(make_config(pretrained_model_name_or_path=str(checkpoint)))
    assert loaded.is_sdxl == (kind == "sdxl")
    parts = [("unet", loaded.unet), ("vae", loaded.vae), ("text_encoder", loaded.text_encoders[0])]
    if kind == "sdxl":
        parts.append(("text_encoder_2", loaded.text_encoders[1]))
    for name, ours in parts:
        expected = getattr(pipe, name).state_dict()
        got = ours.state_dict()
        assert expected.keys() == got.keys(), name
        assert all(torch.equal(expected[k], got[k].reshape(expected[k].shape)) for k in expected), name


def test_shipped_single_file_configs_describe_sd15_and_sdxl():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    from training.models import single_file_config_dir

    sd15 = UNet2DConditionModel.load_config(single_file_config_dir("sd1") / "unet")
    assert sd15["cross_attention_dim"] == 768 and sd15["block_out_channels"] == [320, 640, 1280, 1280]
    xl = single_file_config_dir("sdxl")
    assert UNet2DConditionModel.load_config(xl / "unet")["cross_attention_dim"] == 2048
    assert CLIPTokenizer.from_pretrained(xl / "tokenizer_2").pad_token == "!"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notes inside diffusers' k-samplers
def test_every_kohya_sampler_name_builds_a_diffusers_scheduler(tiny_sd15_dir):
    import json as _json

    from training.sampling import SAMPLERS, make_scheduler

    base = _json.loads((tiny_sd15_dir / "scheduler" / "scheduler_config.json").read_text())
    for name in [*SAMPLERS, "k_euler_a"]:
        scheduler = make_scheduler(name, base)
        scheduler.set_timesteps(4)
        assert len(scheduler.timesteps) >= 4, name
    with pytest.raises(ConfigError, match="sample_sampler"):
        make_scheduler("no_such_sampler", base)


@pytest.mark.parametrize("kind, unet_modules, te_modules", [("sd1", 192, [72]), ("sdxl", 722, [72, 192])])
def test_real_architectures_get_kohyas_module_counts(kind, unet_modules, te_modules):
    """sd-scripts logs 72 + 192 LoRA modules for SD 1.5 and 264 + 722 for SDXL; built without weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from training.models import single_file_config_dir
    from training.network import _TE_CONTAINERS, _UNET_CONTAINERS, target_module_names

    folder = single_file_config_dir(kind)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if kind == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")))
    assert len(target_module_names(unet, _UNET_CONTAINERS)) == unet_modules
    assert [len(target_module_names(te, _TE_CONTAINERS)) for te in encoders] == te_modules
