"""The model-family seam for SD3 and Z-Image: detection, flow-matching sampling, the model's conventions.

The conventions are checked against each pipeline's own denoising loop: a transformer that outputs
exactly what the family's loss rewards must walk the pipeline from pure noise to the clean latent.
"""

import json

import pytest
import torch

from training.dit import DitConditioning, DitLoadError, SD3Family, ZImageFamily
from training.dit_lora import DitLora
from training.errors import ConfigError
from training.dit import family
from training.families import UnsupportedModelError, detect_family
from training.flow import FlowSettings, loss_weights, sample_sigmas
from training.tiny_dit import build_tiny_sd3, build_tiny_zimage, save_tiny_sd3, save_tiny_zimage
from dit_fixtures import one_torch_thread  # noqa: F401  (autouse)

FAMILIES = {"sd3": SD3Family(), "zimage": ZImageFamily()}


def write_index(folder, class_name):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return folder


# --- detection -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("class_name,expected", [
    ("StableDiffusionPipeline", "sd1"), ("StableDiffusionXLPipeline", "sdxl"),
    ("StableDiffusion3Pipeline", "sd3"), ("ZImagePipeline", "zimage")])
def test_family_is_read_from_model_index(tmp_path, class_name, expected):
    assert detect_family(write_index(tmp_path / "m", class_name)) == expected


def test_unknown_pipeline_is_refused_in_one_line_naming_it_and_what_is_supported(tmp_path):
    with pytest.raises(UnsupportedModelError) as err:
        detect_family(write_index(tmp_path / "flux", "FluxPipeline"))
    message = str(err.value)
    assert "\n" not in message and "FluxPipeline" in message
    for supported in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
                      "ZImagePipeline"):
        assert supported in message


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match="model_index.json"):
        detect_family(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match="not readable JSON"):
        detect_family(tmp_path)


def test_unet_families_have_no_dit_implementation():
    assert family("sd3").pipeline_class == "StableDiffusion3Pipeline"
    with pytest.raises(UnsupportedModelError, match="sd1"):
        family("sd1")


# --- timestep sampling -------------------------------------------------------------------------------------

def draw(n=20000, seed=0, **settings):
    return sample_sigmas(FlowSettings(**settings), n, generator=torch.Generator().manual_seed(seed))


def test_sigmas_lie_on_the_1000_step_table_and_never_reach_zero():
    sigmas = draw()
    assert sigmas.min() >= 0.001 and sigmas.max() <= 1.0
    assert torch.allclose(sigmas * 1000, (sigmas * 1000).round(), atol=1e-3)
    assert abs(sigmas.mean().item() - 0.5) < 0.01


def test_training_shift_moves_samples_toward_noise():
    # s*u / (1 + (s-1)*u) at u = 0.5 with s = 3 is 0.75 (the median of the shifted draw)
    assert abs(draw(training_shift=3.0).median().item() - 0.75) < 0.01
    assert draw(training_shift=0.5).median() < 0.4


def test_logit_mean_follows_the_sd3_paper_direction():
    assert draw(weighting_scheme="logit_normal", logit_mean=1.0).mean() > 0.65
    assert draw(weighting_scheme="logit_normal", logit_mean=-1.0).mean() < 0.35
    narrow = draw(weighting_scheme="logit_normal", logit_std=0.3)
    assert narrow.std() < draw(weighting_scheme="logit_normal").std() < draw().std()


def test_mode_scheme_favours_the_middle():
    mode = draw(weighting_scheme="mode", mode_scale=1.29)
    assert abs(mode.median().item() - 0.5) < 0.02 and mode.std() < draw().std()


def test_same_generator_state_draws_the_same_sigmas():
    assert torch.equal(draw(seed=7, weighting_scheme="logit_normal"), draw(seed=7, weighting_scheme="logit_normal"))


def test_loss_weights_only_for_the_weighting_schemes_that_have_them():
    sigmas = draw(n=100)
    assert torch.equal(loss_weights(FlowSettings("uniform"), sigmas), torch.ones(100))
    assert torch.allclose(loss_weights(FlowSettings("sigma_sqrt"), sigmas), sigmas ** -2)
    assert torch.isfinite(loss_weights(FlowSettings("sigma_sqrt"), sigmas)).all()


@pytest.mark.parametrize("settings,key", [(dict(weighting_scheme="lognorm"), "weighting_scheme"),
                                          (dict(training_shift=0.0), "training_shift"),
                                          (dict(logit_std=-1.0), "logit_std")])
def test_bad_flow_settings_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=key):
        FlowSettings(**settings)


# --- the model's conventions, checked in each pipeline's denoising loop --------------------------------

class _RawOutput(torch.nn.Module):
    """A stand-in transformer whose raw output is a given tensor, in the model's output format."""

    def __init__(self, raw, as_list):
        super().__init__()
        self.raw, self.as_list = raw, as_list

    def forward(self, *args, **kwargs):
        return (list(self.raw.unsqueeze(2).unbind(0)) if self.as_list else self.raw,)


def loss_minimizing_output(fam, noisy, sigmas, x0, noise, conditioning):
    """The raw transformer output at which the family's training loss is zero (the loss is quadratic in it)."""
    _, target = fam.noisy_input_and_target(x0, noise, sigmas)
    as_list = isinstance(fam, ZImageFamily)

    def gradient(value):
        raw = torch.full_like(noisy, value, requires_grad=True)
        with torch.enable_grad():  # pipelines sample under no_grad
            prediction = fam.predict(_RawOutput(raw, as_list), noisy, sigmas, conditioning)
            fam.loss(prediction, target, sigmas).sum().backward()
        return raw.grad

    g0, g1 = gradient(0.0), gradient(1.0)
    return -g0 / (g1 - g0)


def perfect_transformer(pipe, fam, x0, calls):
    """Replace the pipeline transformer's forward by the loss minimiser for the known clean latent."""
    sd3 = isinstance(fam, SD3Family)

    def forward(*args, **kwargs):
        step = len(calls)
        sigma = pipe.scheduler.sigmas[step].item()
        noisy = kwargs["hidden_states"] if sd3 else torch.stack(args[0]).squeeze(2)
        timestep = kwargs["timestep"] if sd3 else args[1]
        calls.append((sigma, timestep.float().mean().item()))
        sigmas = torch.full((noisy.shape[0],), sigma)
        noise = (noisy - (1 - sigma) * x0) / sigma
        raw = loss_minimizing_output(fam, noisy, sigmas, x0, noise, DitConditioning(embeds=[None] * len(noisy)))
        return (list(raw.unsqueeze(2).unbind(0)) if not sd3 else raw,)

    pipe.transformer.forward = forward


@pytest.mark.parametrize("name", ["sd3", "zimage"])
def test_a_transformer_with_zero_training_loss_denoises_to_the_clean_latent(tmp_path, name):
    fam = FAMILIES[name]
    pipe = build_tiny_sd3(tmp_path / "tok") if name == "sd3" else build_tiny_zimage()
    torch.manual_seed(0)
    x0, start = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    calls = []
    perfect_transformer(pipe, fam, x0, calls)
    if name == "sd3":
        out = pipe(prompt_embeds=torch.zeros(1, 4, 64), pooled_prompt_embeds=torch.zeros(1, 80), guidance_scale=1.0,
                   num_inference_steps=3, height=16, width=16, latents=start.clone(), output_type="latent").images
    else:
        out = pipe(prompt_embeds=[torch.zeros(4, 16)], guidance_scale=0.0, num_inference_steps=3, height=16, width=16,
                   latents=start.clone(), output_type="latent").images
    assert len(calls) == 3
    for sigma, timestep in calls:  # the timestep the pipeline passes is the family's for the scheduler's sigma
        assert timestep == pytest.approx(fam.model_timestep(torch.tensor(sigma)).item(), abs=1e-4)
    assert torch.allclose(out, x0, atol=1e-4)
    assert not torch.allclose(start, x0, atol=0.5)


def test_z_image_output_is_the_negated_velocity_and_sd3_output_the_velocity():
    x0, noise, sigmas = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([0.3, 0.8])
    noisy = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
    cond = DitConditioning(embeds=[None, None])
    assert torch.allclose(loss_minimizing_output(SD3Family(), noisy, sigmas, x0, noise, cond), noise - x0, atol=1e-5)
    assert torch.allclose(loss_minimizing_output(ZImageFamily(), noisy, sigmas, x0, noise, cond), x0 - noise, atol=1e-5)


# --- one training step through the seam, from a saved diffusers folder ----------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {"sd3": save_tiny_sd3(root / "sd3"), "zimage": save_tiny_zimage(root / "zimage")}


@pytest.mark.parametrize("name", ["sd3", "zimage"])
def test_one_training_step_from_a_diffusers_folder_trains_the_lora(folders, name):
    assert detect_family(folders[name]) == name
    fam = family(name).with_flow(FlowSettings(weighting_scheme="logit_normal", training_shift=3.0))
    pipe = fam.load(folders[name])
    lora = DitLora(pipe.transformer, fam, dim=4, alpha=8)
    cond = fam.encode_captions(pipe, ["a photo of sks dog", "a dog"])
    joined = DitConditioning.join(cond.split())
    assert all(torch.equal(a, b) for a, b in zip(joined.embeds, cond.embeds))
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    with torch.no_grad():
        latents = fam.normalize_latents(pipe.vae, pipe.vae.encode(pixels).latent_dist.mode())
    noise = torch.randn(latents.shape, generator=generator)
    sigmas = fam.sample_noise_levels(2, generator=generator)
    noisy, target = fam.noisy_input_and_target(latents, noise, sigmas)
    loss = fam.loss(fam.predict(pipe.transformer, noisy, sigmas, cond), target, sigmas)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    grads = [p.grad for p in lora.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    frozen = [p for n, p in pipe.transformer.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen)


def test_loading_a_folder_with_the_wrong_family_says_which_it_is(folders):
    with pytest.raises(DitLoadError, match="is a sd3 model, not zimage"):
        family("zimage").load(folders["sd3"])


# --- sampling and metadata ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd3", "zimage"])
def test_cfg_1_ignores_the_negative_prompt_and_higher_cfg_uses_it(tmp_path, name):
    import numpy as np

    fam = FAMILIES[name]
    pipe = build_tiny_sd3(tmp_path / "tok") if name == "sd3" else build_tiny_zimage()

    def image(negative, cfg, seed=1):
        out = fam.sample(pipe, "a photo of sks dog", negative_prompt=negative, width=32, height=32, steps=2,
                         cfg_scale=cfg, seed=seed)
        return np.asarray(out, dtype=np.int16)

    first = image("blurry", 1.0)
    assert first.shape == (32, 32, 3)
    assert np.array_equal(first, image("ugly, watermark", 1.0))  # no guidance: the negative prompt is unused
    assert not np.array_equal(image("blurry", 3.0), image("ugly, watermark", 3.0))
    assert np.array_equal(image("blurry", 3.0), image("blurry", 3.0))  # same seed, same image
    assert fam.sampling_defaults(turbo=True).cfg_scale == 1.0 and fam.sampling_defaults(turbo=True).steps <= 8


def test_metadata_names_the_sd3_version_as_sd_scripts_and_the_timestep_sampling():
    from training.tiny_dit import tiny_sd3_transformer, tiny_zimage_transformer

    fam = SD3Family().with_flow(FlowSettings(weighting_scheme="logit_normal", training_shift=3.0))
    meta = fam.metadata(tiny_sd3_transformer())  # qk_norm and no dual attention: SD3.5 Large's layout
    assert meta["ss_base_model_version"] == "5-large" and meta["ss_weighting_scheme"] == "logit_normal"
    assert meta["ss_training_shift"] == "3.0" and all(isinstance(v, str) for v in meta.values())
    assert ZImageFamily().metadata(tiny_zimage_transformer())["ss_base_model_version"] == "zimage"


@pytest.mark.parametrize("name", ["sd3", "zimage"])
def test_training_loss_replays_from_the_rng_state_and_falls_as_the_lora_trains(name):
    from training.tiny_dit import tiny_sd3_transformer, tiny_zimage_transformer

    fam = FAMILIES[name].with_flow(FlowSettings(weighting_scheme="logit_normal"))
    model = tiny_sd3_transformer() if name == "sd3" else tiny_zimage_transformer()
    lora = DitLora(model, fam, dim=4, alpha=4)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    if name == "sd3":
        cond = DitConditioning(torch.randn(2, 5, 64, generator=generator), torch.randn(2, 80, generator=generator))
    else:
        cond = DitConditioning([torch.randn(5, 16, generator=generator), torch.randn(3, 16, generator=generator)])
    state = generator.get_state()
    first = fam.training_loss(model, latents, cond, generator)
    generator.set_state(state)
    assert torch.equal(fam.training_loss(model, latents, cond, generator), first)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=1e-2)

    def fixed_step_loss():
        generator.set_state(state)  # the same noise and sigmas every time: only the LoRA changes
        return fam.training_loss(model, latents, cond, generator).mean()

    before = fixed_step_loss().item()
    for _ in range(15):
        optimizer.zero_grad()
        fixed_step_loss().backward()
        optimizer.step()
    assert fixed_step_loss().item() < 0.9 * before


def test_sd3_samples_see_as_many_t5_tokens_as_training_encodes(tmp_path):
    """``t5xxl_max_token_length`` sets the caption length of the cached conditioning and of the samples alike."""
    pipe = build_tiny_sd3(tmp_path / "tok")
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    for tokens in (256, 5):
        fam = SD3Family(t5_max_length=tokens)
        seen.clear()
        fam.sample(pipe, "a photo of sks dog", width=32, height=32, steps=1, cfg_scale=1.0)
        assert seen == [fam.encode_captions(pipe, ["a photo of sks dog"]).embeds.shape[1]] == [77 + tokens]
