"""``lora-search train`` on tiny SD3 and Z-Image diffusers folders: files that diffusers loads at the LoRA
formula's strength, a LoRA that fits its images better than the base, exact resume, samples, the Z-Image
Turbo training adapter, attention-only targets, fp8 storage, and what is refused before training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from dit_fixtures import merged, one_torch_thread  # noqa: F401  (autouse)
from helpers import write_dataset
from training.config import config_from_dict, write_config
from training.dit import DitFamily, family
from training.errors import ConfigError
from training.tiny_dit import save_tiny_sd3, save_tiny_zimage
from training.trainer import train

FAMILIES = ["sd3", "zimage"]


@pytest.fixture(scope="module")
def dit_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_models")
    return {"sd3": save_tiny_sd3(root / "sd3"), "zimage": save_tiny_zimage(root / "zimage")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("dit_data"), images=2, repeats=2)


def dit_config(model: Path, data: Path, out: Path, prompts: Path | None = None, **overrides):
    values = dict(pretrained_model_name_or_path=str(model), train_data_dir=str(data), resolution="64",
                  caption_extension=".txt", output_dir=str(out), output_name="lora", max_train_epochs=2,
                  network_dim=4, network_alpha=8, learning_rate=3e-3, seed=7, network_train_unet_only=True,
                  cache_latents=True, max_data_loader_n_workers=0, save_every_n_epochs=1)
    if prompts is not None:
        values |= dict(sample_prompts=str(prompts), sample_every_n_epochs=1)
    return config_from_dict(values | overrides)


def lora_deltas(fam: DitFamily, path: Path) -> dict[str, torch.Tensor]:
    """``module path -> scale * up @ down`` read from a saved file (the LoRA formula, by hand)."""
    return {m: scale * up.float() @ down.float() for m, (down, up, scale) in fam.read_file_state_dict(
        load_file(str(path))).items()}


def load_pipe(name: str, folder: Path):
    import diffusers

    cls = {"sd3": diffusers.StableDiffusion3Pipeline, "zimage": diffusers.ZImagePipeline}[name]
    return cls.from_pretrained(folder, local_files_only=True)


def transformer_output(model, name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 8, 8, generator=generator)
    with torch.no_grad():
        if name == "sd3":
            return model(hidden_states=latents, encoder_hidden_states=torch.randn(1, 6, 64, generator=generator),
                         pooled_projections=torch.randn(1, 80, generator=generator), timestep=torch.tensor([500.0]),
                         return_dict=False)[0]
        out = model(list(latents.unsqueeze(2).unbind(0)), torch.tensor([0.5]),
                    [torch.randn(5, 16, generator=generator)], return_dict=False)[0]
        return torch.stack(out)


@pytest.mark.parametrize("name", FAMILIES)
def test_train_writes_files_diffusers_loads_at_the_formulas_strength(name, dit_dirs, dataset, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ohwx cat --w 64 --h 96 --s 2\n{trigger} on a sofa --w 64 --h 64 --s 2 --d 5\n")
    cfg = dit_config(dit_dirs[name], dataset, tmp_path / "run", prompts, metadata_trigger_phrase="ohwx")
    events = []
    result = train(cfg, on_epoch_end=events.append)
    out = tmp_path / "run"
    assert result.steps == 8 and [e.epoch for e in events] == [1, 2]
    assert events[0].checkpoint == out / "lora-000001.safetensors" and result.checkpoint == out / "lora.safetensors"
    assert sorted(p.name for p in (out / "sample").glob("*.png")) == [
        "lora_e000001_00.png", "lora_e000001_01.png", "lora_e000002_00.png", "lora_e000002_01.png"]
    assert Image.open(out / "sample" / "lora_e000002_00.png").size == (64, 96)
    with safe_open(str(result.checkpoint), framework="pt") as fh:
        meta = fh.metadata()
    expected_version = "5-large" if name == "sd3" else "zimage"
    assert meta["ss_base_model_version"] == expected_version and meta["ss_network_dim"] == "4"
    assert meta["ss_weighting_scheme"] == "uniform" and meta["ss_steps"] == "8"
    assert meta["modelspec.architecture"] == ("stable-diffusion-v3.5-large/lora" if name == "sd3" else "z-image/lora")

    pipe = load_pipe(name, dit_dirs[name])
    base = copy.deepcopy(pipe.transformer)
    pipe.load_lora_weights(str(result.checkpoint))
    deltas = lora_deltas(family(name), result.checkpoint)
    loaded = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}
    assert loaded == set(deltas) and len(deltas) == (25 if name == "sd3" else 31)  # every key used
    expected = transformer_output(merged(base, deltas), name)
    assert not torch.allclose(expected, transformer_output(base, name), atol=1e-4)  # training changed it
    assert torch.allclose(transformer_output(pipe.transformer, name), expected, atol=1e-5)


def training_latents(name: str, folder: Path, data: Path):
    """The dataset's images as normalised latents at 64 px, and their captions' conditioning."""
    import numpy as np

    pipe = load_pipe(name, folder)
    fam = family(name)
    images = sorted(data.glob("*/*.png"))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                          / 127.5 - 1 for p in images])
    with torch.no_grad():
        raw = pipe.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    latents = fam.normalize_latents(pipe.vae, raw)
    cond = fam.encode_captions(pipe, [p.with_suffix(".txt").read_text() for p in images])
    return pipe, fam, latents, cond


@pytest.mark.parametrize("name", FAMILIES)
def test_the_trained_lora_fits_its_images_better_than_the_base(name, dit_dirs, dataset, tmp_path):
    result = train(dit_config(dit_dirs[name], dataset, tmp_path / "run", max_train_epochs=12, network_dim=8,
                              network_alpha=8))
    pipe, fam, latents, cond = training_latents(name, dit_dirs[name], dataset)
    base = pipe.transformer
    tuned = merged(base, lora_deltas(fam, result.checkpoint))

    def loss(model):  # the same 16 noise and sigma draws for both models
        generator = torch.Generator().manual_seed(11)
        with torch.no_grad():
            return float(torch.stack([fam.training_loss(model, latents, cond, generator).mean()
                                      for _ in range(16)]).mean())

    before, after = loss(base), loss(tuned)
    assert after < 0.95 * before, (before, after)  # random-pixel images: little to learn but themselves


@pytest.mark.parametrize("name", FAMILIES)
def test_an_interrupted_run_resumes_to_the_same_weights(name, dit_dirs, dataset, tmp_path):
    straight = train(dit_config(dit_dirs[name], dataset, tmp_path / "straight", save_state=True, network_dropout=0.1))
    cfg = dit_config(dit_dirs[name], dataset, tmp_path / "resumed", save_state=True, network_dropout=0.1)

    class Stop(Exception):
        pass

    def stop(event):
        raise Stop

    with pytest.raises(Stop):
        train(cfg, on_epoch_end=stop)
    assert not (tmp_path / "resumed" / "lora.safetensors").exists()
    resumed = train(cfg, resume=True)
    a, b = load_file(str(straight.checkpoint)), load_file(str(resumed.checkpoint))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)


@pytest.mark.parametrize("name", FAMILIES)
def test_samples_regenerated_from_a_checkpoint_match_the_training_samples(name, dit_dirs, dataset, tmp_path):
    from training.sampling import generate_samples

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ohwx cat --w 64 --h 64 --s 2 --l 3\n")
    cfg = dit_config(dit_dirs[name], dataset, tmp_path / "run", prompts, max_train_epochs=1)
    result = train(cfg)
    again = config_from_dict(cfg.to_dict() | {"output_dir": str(tmp_path / "again")})
    [path] = generate_samples(again, result.checkpoint, epoch=1)
    first = torch.tensor(list(Image.open(tmp_path / "run" / "sample" / path.name).getdata()), dtype=torch.float)
    assert (first - torch.tensor(list(Image.open(path).getdata()), dtype=torch.float)).abs().max() <= 2


def test_prompts_without_steps_take_the_familys_defaults_and_turbo_its_few_steps(dit_dirs, dataset, tmp_path):
    from training.sampling import load_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 64 --h 64\na dog --s 3 --l 2.5\n")
    seen = {}
    for name in FAMILIES:
        for turbo in (False, True):
            cfg = dit_config(dit_dirs[name], dataset, tmp_path / "x", prompts, turbo=turbo)
            seen[name, turbo] = [(p.steps, p.scale) for p in load_prompts(cfg)]
    assert seen["sd3", False] == [(28, 7.0), (3, 2.5)] and seen["sd3", True] == [(4, 1.0), (3, 2.5)]
    assert seen["zimage", False] == [(25, 3.0), (3, 2.5)] and seen["zimage", True] == [(8, 1.0), (3, 2.5)]


def write_adapter(folder: Path, path: Path) -> Path:
    """A random training adapter for the tiny Z-Image transformer, in the family's file format."""
    from training.dit_lora import DitLora

    transformer = load_pipe("zimage", folder).transformer
    adapter = DitLora(transformer, family("zimage"), dim=2, alpha=2, attention_only=True)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return adapter.save(path, {})


def test_zimage_turbo_adapter_trains_merged_and_samples_without_it(dit_dirs, dataset, tmp_path):
    adapter = write_adapter(dit_dirs["zimage"], tmp_path / "adapter.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ohwx cat --w 64 --h 64 --s 2\n")
    cfg = dit_config(dit_dirs["zimage"], dataset, tmp_path / "run", prompts, max_train_epochs=1,
                     training_adapter=str(adapter), turbo=True)
    result = train(cfg)
    with safe_open(str(result.checkpoint), framework="pt") as fh:
        assert fh.metadata()["ss_training_adapter"] == "adapter.safetensors"
    # The sample is the turbo model with the new LoRA alone: the adapter is not in it.
    fam = family("zimage")
    pipe = load_pipe("zimage", dit_dirs["zimage"])
    pipe.transformer = merged(pipe.transformer, lora_deltas(fam, result.checkpoint))
    image = fam.sample(pipe, "ohwx cat", width=64, height=64, steps=2, cfg_scale=1.0, seed=cfg.seed + 1000)
    sample = Image.open(tmp_path / "run" / "sample" / "lora_e000001_00.png")
    difference = (torch.tensor(list(image.getdata()), dtype=torch.float)
                  - torch.tensor(list(sample.getdata()), dtype=torch.float)).abs().max()
    assert difference <= 2  # one rounding step of the 8-bit image at most
    # and trained against the merged adapter: the same run without it learns something else
    plain = train(dit_config(dit_dirs["zimage"], dataset, tmp_path / "plain", max_train_epochs=1))
    a, b = load_file(str(result.checkpoint)), load_file(str(plain.checkpoint))
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,modules", [("sd3", 15), ("zimage", 16)])
def test_attention_only_trains_and_saves_only_attention_projections(name, modules, dit_dirs, dataset, tmp_path):
    result = train(dit_config(dit_dirs[name], dataset, tmp_path / "run", max_train_epochs=1,
                              network_attention_only=True))
    deltas = lora_deltas(family(name), result.checkpoint)
    assert len(deltas) == modules and all(".attention." in p or ".attn" in p for p in deltas)


def test_fp8_base_trains_in_bf16_and_saves_float32_lora(dit_dirs, dataset, tmp_path):
    result = train(dit_config(dit_dirs["sd3"], dataset, tmp_path / "run", max_train_epochs=1, fp8_base=True,
                              mixed_precision="bf16"))
    tensors = load_file(str(result.checkpoint))
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in tensors.items())


@pytest.mark.parametrize("name,overrides,message", [
    ("sd3", {"min_snr_gamma": 5.0}, "min_snr_gamma applies to SD 1.x/SDXL"),
    ("zimage", {"noise_offset": 0.05}, "noise_offset applies to SD 1.x/SDXL"),
    ("zimage", {"text_encoder_lr": 1e-4}, "does not train the Z-Image text encoders"),
    ("sd3", {"training_adapter": "a.safetensors"}, "training_adapter is for Z-Image Turbo"),
    ("zimage", {"clip_l": "clip_l.safetensors"}, "applies to SD3 models only"),
    ("sd3", {"fp8_base": True}, 'set mixed_precision = "bf16"'),
    ("zimage", {"torch_compile": True}, "runs the zimage transformer uncompiled"),
    ("sd3", {"full_bf16": True, "mixed_precision": "bf16"}, "keeps sd3 LoRA weights in float32"),
])
def test_options_a_dit_run_would_ignore_are_refused_before_anything_is_written(name, overrides, message, dit_dirs,
                                                                               dataset, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(dit_config(dit_dirs[name], dataset, tmp_path / "run", **overrides))
    assert not (tmp_path / "run").exists()


def test_a_bad_training_adapter_is_one_line_and_no_run_folder(dit_dirs, dataset, tmp_path, capsys):
    from search.cli import main

    sd3_lora = train(dit_config(dit_dirs["sd3"], dataset, tmp_path / "sd3run", max_train_epochs=1)).checkpoint
    for adapter, message in [(tmp_path / "missing.safetensors", "no such file"), (sd3_lora, "no zimage LoRA keys")]:
        cfg = dit_config(dit_dirs["zimage"], dataset, tmp_path / "run", training_adapter=str(adapter))
        config = write_config(tmp_path / "c.toml", cfg.to_dict(include_defaults=False))
        capsys.readouterr()
        assert main(["train", str(config)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and str(adapter) in err[0], err
        assert not (tmp_path / "run").exists()


def test_an_sd3_folder_saved_without_t5_passes_the_check_and_trains(dataset, tmp_path):
    from search.preflight import check_model
    from training.tiny_dit import build_tiny_sd3

    pipe = build_tiny_sd3(tmp_path / "tok")
    pipe.text_encoder_3 = pipe.tokenizer_3 = None  # T5-XXL left out to save memory, as diffusers allows
    pipe.save_pretrained(tmp_path / "sd3_no_t5")
    cfg = dit_config(tmp_path / "sd3_no_t5", dataset, tmp_path / "run", max_train_epochs=1)
    assert check_model(cfg)[0] == "sd3"
    tensors = load_file(str(train(cfg).checkpoint))
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in tensors.items())


@pytest.mark.parametrize("name", FAMILIES)
def test_uncached_latents_and_shuffled_captions_encode_every_step(name, dit_dirs, dataset, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="training.trainer")
    result = train(dit_config(dit_dirs[name], dataset, tmp_path / "run", max_train_epochs=1, cache_latents=False,
                              shuffle_caption=True, keep_tokens=1, caption_dropout_rate=0.5))
    assert "shuffled captions are encoded every step" in caplog.text and result.steps == 4
    tensors = load_file(str(result.checkpoint))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in tensors.items())
