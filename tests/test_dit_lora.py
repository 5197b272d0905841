"""LoRA on the SD3 and Z-Image transformers: targets, the saved file in diffusers and in ComfyUI, round trips.

ComfyUI is not installed; the key patterns its LoRA loader accepts for these models are written down
here from its documented behaviour (``comfy/lora.py`` ``model_lora_keys_unet``, ``comfy/utils.py``
``mmdit_to_diffusers`` / ``z_image_to_diffusers``, ``comfy/weight_adapter/lora.py``): a LoRA key is
``<prefix><diffusers module path>`` followed by ``.lora_A.weight``/``.lora_B.weight`` (or
``.lora_down``/``.lora_up``); the strength is ``<key>.alpha / rank`` when that tensor exists, else 1;
safetensors metadata is not read; keys it does not know are skipped with a log line.
"""

import copy
from functools import partial

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training.dit import SD3Family, ZImageFamily
from training.dit_lora import DitLora
from training.errors import LoraSearchError
from training.tiny_dit import build_tiny_sd3, build_tiny_zimage, tiny_sd3_transformer, tiny_zimage_transformer
from dit_fixtures import merged, one_torch_thread  # noqa: F401  (autouse)

# kind -> (family, tiny transformer); "sd35m" has SD3.5 Medium's dual attention blocks
FAMILIES = {"sd3": SD3Family(), "sd35m": SD3Family(), "zimage": ZImageFamily()}
BUILD = {"sd3": tiny_sd3_transformer, "sd35m": partial(tiny_sd3_transformer, dual_attention_layers=(0,)),
         "zimage": tiny_zimage_transformer}
KINDS = ["sd3", "sd35m", "zimage"]
RANK, ALPHA = 4, 8.0  # strength alpha / rank = 2: a loader that drops alpha is caught


def randomized_lora(name, **kw):
    """A LoRA with non-zero up and down weights on a fresh tiny transformer, and the untouched base."""
    base = BUILD[name]()
    model = copy.deepcopy(base)
    lora = DitLora(model, FAMILIES[name], dim=RANK, alpha=ALPHA, **kw)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in lora.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return base, model, lora


def formula_deltas(lora):
    return {path: lora.scale * up @ down for path, (down, up) in lora.pairs().items()}


def inputs(name):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 8, 8, generator=generator)
    if name != "zimage":
        return dict(hidden_states=latents, encoder_hidden_states=torch.randn(1, 6, 64, generator=generator),
                    pooled_projections=torch.randn(1, 80, generator=generator), timestep=torch.tensor([500.0]))
    return dict(x=list(latents.unsqueeze(2).unbind(0)), t=torch.tensor([0.5]),
                cap_feats=[torch.randn(5, 16, generator=generator)])


def output(model, name):
    with torch.no_grad():
        out = model(**inputs(name), return_dict=False)[0]
    return torch.stack(out) if name == "zimage" else out


# --- targets --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,default,attention", [("sd3", 25, 15), ("sd35m", 29, 19), ("zimage", 31, 16)])
def test_every_block_linear_by_default_and_attention_only_on_request(name, default, attention):
    model = BUILD[name]()
    fam = FAMILIES[name]
    targets = fam.lora_targets(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(targets) == default and set(targets) <= linears
    blocks = ("layers.", "noise_refiner.", "context_refiner.") if name == "zimage" else ("transformer_blocks.",)
    assert all(t.startswith(blocks) for t in targets)
    attn = fam.lora_targets(model, attention_only=True)
    assert len(attn) == attention and all((".attn." in t or ".attn2." in t or ".attention." in t) for t in attn)


@pytest.mark.parametrize("name", ["sd3", "zimage"])
def test_a_new_lora_leaves_the_output_unchanged_and_only_lora_weights_train(name):
    base = BUILD[name]()
    model = copy.deepcopy(base)
    lora = DitLora(model, FAMILIES[name], dim=RANK, alpha=ALPHA, dropout=0.1)
    model.eval()
    assert torch.equal(output(model, name), output(base, name))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(lora.targets) and all(p.dtype == torch.float32 for p in trainable)


# --- the saved file in diffusers --------------------------------------------------------------------------

def lora_layer_paths(model):
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}


@pytest.mark.parametrize("name", KINDS)
def test_diffusers_load_lora_weights_uses_every_key_at_the_right_strength(tmp_path, name):
    base, model, lora = randomized_lora(name)
    path = lora.save(tmp_path / "lora.safetensors", {"ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA)})
    pipe = build_tiny_zimage() if name == "zimage" else build_tiny_sd3(tmp_path / "tok")
    pipe.transformer = copy.deepcopy(base)
    pipe.load_lora_weights(str(path))
    assert lora_layer_paths(pipe.transformer) == set(lora.targets)
    expected = output(merged(base, formula_deltas(lora)), name)
    assert not torch.allclose(expected, output(base, name), atol=1e-3)  # the LoRA does change the output
    assert torch.allclose(output(pipe.transformer, name), expected, atol=1e-5)


# --- the saved file in ComfyUI (its key patterns, emulated) -----------------------------------------------

def comfy_sd3_lora_names(config):
    """The LoRA names ComfyUI maps for an SD3 model from diffusers module paths (SD3 branch)."""
    paths = ["context_embedder", "pos_embed.proj", "norm_out.linear", "proj_out",
             "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
             "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2"]
    per_block = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn.to_out.0", "attn.to_add_out", "attn2.to_out.0",
                 "norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                 "ff_context.net.2"]
    paths += [f"transformer_blocks.{i}.{p}" for i in range(config.num_layers) for p in per_block]
    names = set()
    for path in paths:
        flat = path.replace(".", "_")
        names |= {f"transformer.{path}", f"base_model.model.{path}", f"lora_transformer_{flat}", f"lycoris_{flat}"}
    return names


def comfy_zimage_lora_names(config):
    """The LoRA names ComfyUI maps for a Z-Image model from diffusers module paths (Lumina 2 branch)."""
    paths = ["all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1", "all_x_embedder.2-1",
             "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2"]
    per_block = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"]
    blocks = [f"layers.{i}" for i in range(config.n_layers)]
    blocks += [f"{kind}.{i}" for kind in ("noise_refiner", "context_refiner") for i in range(config.n_refiner_layers)]
    paths += [f"{block}.{p}" for block in blocks for p in per_block]
    names = set()
    for path in paths:
        names |= {f"diffusion_model.{path}", f"transformer.{path}", path, f"lycoris_{path.replace('.', '_')}"}
    return names


def comfy_load(tensors, names):
    """ComfyUI's reading of a LoRA file: ``{diffusers path: weight delta}`` and the tensor keys left unused."""
    used, deltas = set(), {}
    for key in tensors:
        stem, suffix = key.rsplit(".lora_", 1) if ".lora_" in key else (key, "")
        if suffix != "A.weight" or stem not in names:
            continue
        down, up = tensors[key], tensors[f"{stem}.lora_B.weight"]
        alpha = tensors.get(f"{stem}.alpha")
        scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
        path = stem.split(".", 1)[1] if stem.startswith(("transformer.", "diffusion_model.")) else stem
        deltas[path] = scale * up.float() @ down.float()
        used |= {key, f"{stem}.lora_B.weight"} | ({f"{stem}.alpha"} if alpha is not None else set())
    return deltas, set(tensors) - used


@pytest.mark.parametrize("name", KINDS)
def test_comfyui_maps_every_key_and_applies_the_trained_strength(tmp_path, name):
    base, model, lora = randomized_lora(name)
    path = lora.save(tmp_path / "lora.safetensors", {"ss_network_alpha": str(ALPHA)})
    names = (comfy_zimage_lora_names if name == "zimage" else comfy_sd3_lora_names)(base.config)
    deltas, unused = comfy_load(load_file(str(path)), names)
    assert unused == set() and set(deltas) == set(lora.targets)
    expected = formula_deltas(lora)
    assert all(torch.allclose(deltas[p], expected[p], atol=1e-6) for p in lora.targets)


# --- round trips and refusals -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd3", "zimage"])
def test_file_round_trip_restores_the_same_update_and_state_round_trip_is_exact(tmp_path, name):
    base, model, lora = randomized_lora(name)
    path = lora.save(tmp_path / "lora.safetensors", {})
    again = DitLora(copy.deepcopy(base), FAMILIES[name], dim=RANK, alpha=ALPHA / 2)  # another alpha: rescaled
    again.load(path)
    assert torch.allclose(output(again.transformer, name), output(model, name), atol=1e-5)
    exact = DitLora(copy.deepcopy(base), FAMILIES[name], dim=RANK, alpha=ALPHA)
    exact.load_state_dict(lora.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(exact.parameters(), lora.parameters()))


def test_saved_file_has_the_requested_precision_and_the_metadata(tmp_path):
    _, _, lora = randomized_lora("zimage")
    path = lora.save(tmp_path / "lora.safetensors", {"ss_network_dim": "4"}, dtype=torch.bfloat16)
    with safe_open(str(path), framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
        assert fh.metadata()["ss_network_dim"] == "4" and len(fh.metadata()["sshs_model_hash"]) == 64


def test_a_file_for_another_model_is_refused_naming_what_is_missing(tmp_path):
    _, _, sd3 = randomized_lora("sd3")
    path = sd3.save(tmp_path / "sd3.safetensors", {})
    _, _, attention_only = randomized_lora("sd3", attention_only=True)
    with pytest.raises(LoraSearchError, match="10 unexpected"):
        attention_only.load(path)
    _, _, zimage = randomized_lora("zimage")
    with pytest.raises(LoraSearchError, match="31 modules missing"):
        zimage.load(path)
    with pytest.raises(LoraSearchError, match="check network_dim"):
        DitLora(tiny_sd3_transformer(), FAMILIES["sd3"], dim=2, alpha=2).load(path)


@pytest.mark.parametrize("name", ["sd3", "zimage"])
def test_fp8_base_stores_block_weights_in_one_byte_and_still_trains_fp32_lora(name):
    from training.dit import DitConditioning, store_base_in_fp8

    model = store_base_in_fp8(BUILD[name](), torch.bfloat16)
    fam = FAMILIES[name]
    lora = DitLora(model, fam, dim=RANK, alpha=ALPHA)
    layers = lora.layers().values()
    assert sum(layer.base_layer.weight.dtype == torch.float8_e4m3fn for layer in layers) >= len(layers) // 2
    assert {p.dtype for p in lora.parameters()} == {torch.float32}
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=generator), torch.randn(2, 16, 8, 8, generator=generator)
    sigmas = torch.tensor([0.3, 0.8])
    noisy, target = fam.noisy_input_and_target(x0, noise, sigmas)
    if name == "sd3":
        cond = DitConditioning(torch.randn(2, 5, 64).bfloat16(), torch.randn(2, 80).bfloat16())
    else:
        cond = DitConditioning([torch.randn(5, 16).bfloat16(), torch.randn(3, 16).bfloat16()])
    loss = fam.loss(fam.predict(model, noisy.bfloat16(), sigmas, cond), target, sigmas).mean()
    loss.backward()
    assert torch.isfinite(loss) and sum(p.grad.abs().sum() for p in lora.parameters()) > 0
