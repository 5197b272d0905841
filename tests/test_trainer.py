"""The training loop end to end on the tiny model: files, metadata, exact resume, loss math, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import write_dataset
from training.errors import LoraSearchError


class Stop(Exception):
    """Raised from on_epoch_end, as a study pruning a trial would."""


def _write_toml(path: Path, values: dict) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps({"all": values}), encoding="utf-8")
    return path


def test_cli_trains_end_to_end_and_writes_every_file(tmp_path, train_values, tiny_sd15_dir):
    from diffusers import StableDiffusionPipeline

    from search.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\n{trigger} a cat --w 64 --h 64 --s 2 --d 5\nred thing --n blurry --w 64 --h 64 --s 2\n")
    values = {**train_values, "save_every_n_epochs": 1, "sample_prompts": str(prompts), "sample_every_n_epochs": 2,
              "metadata_trigger_phrase": "ohwx", "cache_latents": True, "cache_latents_to_disk": True,
              "save_precision": "fp16", "min_snr_gamma": 5.0, "noise_offset": 0.05, "network_dropout": 0.1,
              "shuffle_caption": True, "keep_tokens": 1, "flip_aug": True, "gradient_checkpointing": True}
    config = _write_toml(tmp_path / "train.toml", values)
    assert main(["train", str(config)]) == 0

    out = Path(values["output_dir"])
    assert (out / "lora-000001.safetensors").is_file() and (out / "lora.safetensors").is_file()
    assert sorted(p.name for p in (out / "sample").iterdir()) == ["lora_e000002_00.png", "lora_e000002_01.png", "prompts.json"]
    listed = json.loads((out / "sample" / "prompts.json").read_text())
    assert listed["trigger"] == "ohwx"
    assert [p["prompt"] for p in listed["prompts"]] == ["ohwx a cat", "red thing"]
    assert listed["prompts"][0]["seed"] == 5 and listed["prompts"][1]["negative_prompt"] == "blurry"
    assert (out / "config.toml").is_file()
    assert [p.name for p in sorted((out / "state").iterdir())] == ["epoch-000001", "epoch-000002"]

    with safe_open(str(out / "lora.safetensors"), "pt") as fh:
        meta = fh.metadata()
        assert fh.get_tensor(next(iter(fh.keys()))).dtype == torch.float16
        # with gradient checkpointing, gradients still reach the text encoder's LoRA
        assert any(fh.get_tensor(k).abs().sum() > 0 for k in fh.keys() if k.startswith("lora_te_") and "lora_up" in k)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_epoch"] == "2" and meta["ss_steps"] == "2"
    assert meta["ss_num_train_images"] == "2" and meta["ss_seed"] == "7" and meta["ss_min_snr_gamma"] == "5.0"
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_ohwx cat": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(meta["ss_tag_frequency"])["1_ohwx cat"]["ohwx"] == 2
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and len(meta["sshs_model_hash"]) == 64
    assert torch.optim.AdamW.__name__ in meta["ss_optimizer"]

    # The trained file loads in diffusers and changes the UNet (its up weights are no longer zero).
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    x, t, hidden = torch.randn(1, 4, 16, 16), torch.tensor([400]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = pipe.unet(x, t, hidden).sample
        pipe.load_lora_weights(str(out / "lora.safetensors"))
        after = pipe.unet(x, t, hidden).sample
    assert not torch.allclose(before, after)


def test_trained_file_matches_the_trainers_network_in_diffusers(make_config, tiny_sd15_dir):
    """The pipeline's UNet with the saved file equals the UNet with the trainer's own LoRA network."""
    from diffusers import StableDiffusionPipeline

    from training import train
    from training.models import load_models
    from training.network import LoraNetwork

    cfg = make_config(max_train_epochs=1)
    result = train(cfg)
    models = load_models(cfg)
    net = LoraNetwork(models.unet, models.text_encoders, dim=4, alpha=2.0)
    net.load(result.checkpoint)
    models.unet.eval()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    pipe.load_lora_weights(str(result.checkpoint))
    x, t, hidden = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, hidden).sample, models.unet(x, t, hidden).sample)


@pytest.mark.parametrize("only, prefix, modules", [("network_train_text_encoder_only", "lora_te", 12),
                                                   ("network_train_unet_only", "lora_unet", 48)])
def test_a_file_holds_only_the_trained_part_and_loads_in_diffusers(make_config, tiny_sd15_dir, only, prefix,
                                                                   modules):
    """sd-scripts saves only what it trained; an untrained part would be all-zero ``lora_up`` weights."""
    from diffusers import StableDiffusionPipeline

    from training import train

    state = load_file(str(train(make_config(max_train_epochs=1, **{only: True})).checkpoint))
    names = {key.split(".")[0] for key in state}
    assert len(names) == modules and all(name.startswith(prefix + "_") for name in names)
    assert set(state) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(state[f"{n}.lora_up.weight"].abs().sum() > 0 for n in names)  # every saved module trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    pipe.load_lora_weights(state)
    with_lora = {"lora_unet": pipe.unet, "lora_te": pipe.text_encoder}
    assert [m for m in with_lora.pop(prefix).modules() if hasattr(m, "lora_A")]
    assert not [m for m in with_lora.popitem()[1].modules() if hasattr(m, "lora_A")]


def _resume_config(make_config, out: Path, workers: int = 0):
    # Every random path on: dropout, noise offset, min-SNR, flips, caption shuffles; accumulation over
    # two batches and a restarting schedule with warmup so the LR curve must continue exactly.
    return make_config(output_dir=str(out), max_train_epochs=3, train_batch_size=1, gradient_accumulation_steps=2,
                       network_dropout=0.1, noise_offset=0.1, min_snr_gamma=5.0, flip_aug=True, shuffle_caption=True,
                       lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2, lr_warmup_steps=1,
                       save_every_n_epochs=1, text_encoder_lr=5e-4, max_data_loader_n_workers=workers)


def test_interrupted_and_resumed_run_ends_with_the_same_weights(make_config, tmp_path):
    from training import train

    straight = train(_resume_config(make_config, tmp_path / "straight"))

    cfg = _resume_config(make_config, tmp_path / "resumed", workers=2)  # threads must not change results
    events = []

    def stop_after_first(event):
        events.append(event)
        if event.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, on_epoch_end=stop_after_first)
    assert events[0].checkpoint == tmp_path / "resumed" / "lora-000001.safetensors" and events[0].checkpoint.is_file()
    assert (tmp_path / "resumed" / "state" / "epoch-000001" / "COMPLETE").is_file()
    resumed = train(cfg, resume=True, on_epoch_end=events.append)

    assert [e.epoch for e in events] == [1, 2, 3]
    assert [e.global_step for e in events] == [1, 2, 3]  # the step counter continues, not restarting at 0
    assert resumed.steps == straight.steps == 3
    a, b = load_file(str(straight.checkpoint)), load_file(str(resumed.checkpoint))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_te" in k and "lora_up" in k)  # the TE trained too


def test_resume_ignores_incomplete_states_and_rejects_a_changed_config(make_config, tmp_path):
    from training import train
    from training.state import latest_state

    cfg = make_config(save_state=True, max_train_epochs=2)
    train(cfg)
    state = Path(cfg.output_dir) / "state"
    newest = state / "epoch-000002"
    (newest / "COMPLETE").unlink()  # as if the write died before its marker
    torn = state / "epoch-000003"
    shutil.copytree(state / "epoch-000001", torn)
    (torn / "lora.safetensors").write_bytes(b"torn")  # marker present, file truncated
    assert latest_state(cfg.output_dir) == state / "epoch-000001"

    events = []
    result = train(cfg, resume=True, on_epoch_end=events.append)
    assert [e.epoch for e in events] == [2] and result.steps == 2

    with pytest.raises(LoraSearchError, match="network_dim"):
        train(make_config(save_state=True, max_train_epochs=2, network_dim=8), resume=True)
    write_dataset(Path(cfg.train_data_dir), images=2, name="more")  # a changed dataset changes the steps
    with pytest.raises(LoraSearchError, match="images added or removed"):
        train(cfg, resume=True)


def test_resume_without_state_starts_fresh_and_max_train_steps_counts_steps(make_config):
    from training import train

    events = []
    result = train(make_config(max_train_epochs=None, max_train_steps=3, train_batch_size=1), resume=True,
                   on_epoch_end=events.append)
    # two images at batch 1: 2 steps per epoch, so 3 steps take 2 epochs, the second cut short
    assert result.steps == 3 and result.epochs == 2 and [e.global_step for e in events] == [2, 3]


def test_min_snr_weights_and_noise_offset_math():
    from diffusers import DDPMScheduler

    from training.trainer import apply_noise_offset, min_snr_weights

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    t = torch.tensor([0, 100, 500, 999])
    abar = sched.alphas_cumprod[t]
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    torch.testing.assert_close(min_snr_weights(sched, t, 5.0, False), expected)
    torch.testing.assert_close(min_snr_weights(sched, t, 5.0, True), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert min_snr_weights(sched, t, 5.0, False)[-1] == pytest.approx(1.0)  # low-SNR steps keep full weight

    torch.manual_seed(0)
    noise = torch.zeros(3, 4, 8, 8)
    shifted = apply_noise_offset(noise, 0.1)
    # one offset per sample and channel, constant over the image
    assert torch.equal(shifted, shifted[:, :, :1, :1].expand_as(shifted))
    assert 0 < shifted.abs().max() < 1.0


def test_bad_model_path_is_a_one_line_cli_error(tmp_path, train_values, capsys):
    from search.cli import main

    values = {**train_values, "pretrained_model_name_or_path": str(tmp_path / "missing.safetensors")}
    assert main(["train", str(_write_toml(tmp_path / "bad.toml", values))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.safetensors" in err[0] and "check the path" in err[0]
    assert not Path(values["output_dir"]).exists()


def test_sdxl_trains_in_bf16_samples_and_its_file_loads_in_diffusers(make_config, tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from training import train

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --w 64 --h 64 --s 2 --d 3\n")
    events = []
    result = train(make_config(pretrained_model_name_or_path=str(tiny_sdxl_dir), max_train_epochs=1,
                               mixed_precision="bf16", enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128,
                               sample_prompts=str(prompts), sample_every_n_epochs=1), on_epoch_end=events.append)
    assert [p.name for p in events[0].samples] == ["lora_e000001_00.png"]
    with safe_open(str(result.checkpoint), "pt") as fh:
        names = {k.split(".")[0] for k in fh.keys()}
        assert fh.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(str(result.checkpoint))
    unet_modules = sum(1 for n in names if n.startswith("lora_unet_"))
    assert sum(1 for m in pipe.unet.modules() if hasattr(m, "lora_A")) == unet_modules > 0


def test_generate_samples_from_a_checkpoint_matches_the_training_samples(make_config, tmp_path):
    import numpy as np
    from PIL import Image

    from training import train
    from training.sampling import generate_samples

    prompts = tmp_path / "p.txt"
    prompts.write_text("{trigger} a cat --w 64 --h 64 --s 3 --d 11 --l 5\n")
    cfg = make_config(max_train_epochs=1, sample_prompts=str(prompts), sample_every_n_epochs=1,
                      metadata_trigger_phrase="ohwx", sample_sampler="euler_a")
    events = []
    result = train(cfg, on_epoch_end=events.append)
    (image,) = events[0].samples
    assert image.name == "lora_e000001_00.png"
    during = np.asarray(Image.open(image)).astype(int)
    image.unlink()
    assert generate_samples(cfg, result.checkpoint, 1) == [image]
    again = np.asarray(Image.open(image)).astype(int)
    assert np.abs(during - again).max() <= 1


def test_second_run_reuses_cached_latents(make_config, tmp_path, caplog):
    import logging

    from training import train

    cache = tmp_path / "cache"
    cfg = make_config(max_train_epochs=1, cache_latents=True, cache_latents_to_disk=True)
    train(cfg, latent_cache_dir=cache)
    entries = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    assert len(entries) == 2
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(make_config(max_train_epochs=1, cache_latents=True, cache_latents_to_disk=True,
                          output_dir=str(tmp_path / "second")), latent_cache_dir=cache)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == entries
    assert not any("encoding" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("overrides, key", [
    ({"network_args": ["conv_dim=4"]}, "network_args"),
    ({"full_fp16": True, "mixed_precision": "fp16"}, "full_fp16"),
    ({"sample_prompts": "missing-prompts.txt", "sample_every_n_epochs": 1}, "missing-prompts.txt"),
])
def test_unsupported_or_bad_settings_fail_before_training(make_config, overrides, key):
    from training import train

    cfg = make_config(**overrides)
    with pytest.raises(LoraSearchError, match=key):
        train(cfg)
    assert not Path(cfg.output_dir).exists()


def test_long_captions_are_encoded_in_75_token_chunks(tiny_sd15_dir, tiny_sdxl_dir):
    from diffusers import DiffusionPipeline

    from training.models import _from_pipeline, encode_captions

    caption = ", ".join(f"tag{i}" for i in range(60))  # longer than 75 byte-level tokens
    for folder in (tiny_sd15_dir, tiny_sdxl_dir):
        models = _from_pipeline(DiffusionPipeline.from_pretrained(folder), str(folder))
        with torch.no_grad():
            short, _ = encode_captions(models, [caption, "cat"], torch.device("cpu"))
            long, added = encode_captions(models, [caption, "cat"], torch.device("cpu"), max_token_length=225)
        assert short.shape[:2] == (2, 77) and long.shape[:2] == (2, 227)
        # the first chunk is the 75-token encoding; later chunks carry the rest of the caption
        torch.testing.assert_close(long[:, :76], short[:, :76])
        assert not torch.allclose(long[0, 76:151], long[1, 76:151])
        if added is not None:
            assert added["text_embeds"].shape[0] == 2 and added["time_ids"].shape == (2, 6)
