"""The pre-flight check on SD3 and Z-Image models: the family is read from the folder or file, the config is
checked for it, the parts its pipeline needs are there, and the trainer (built-in or sd-scripts' script)
suits the model's form. Each bad set-up stops ``lora-search start`` with one line, exit 2, nothing created."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from search.cli import main
from study_fixtures import TOY_MODEL, TOY_TRAIN, make_dit_project, write_fake_sd3_checkpoint
from test_preflight import tree


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny SD3 and Z-Image diffusers folders and a fake SD3 single file, built once for the module."""
    from training.tiny_dit import save_tiny_sd3, save_tiny_zimage

    root = tmp_path_factory.mktemp("dit_models")
    return {"sd3": save_tiny_sd3(root / "sd3"), "zimage": save_tiny_zimage(root / "zimage"),
            "sd3_file": write_fake_sd3_checkpoint(root / "sd35_large.safetensors")}


def sd3_without_text_encoder_3(models, root: Path) -> Path:
    folder = root / "sd3_copy"
    shutil.copytree(models["sd3"], folder)
    shutil.rmtree(folder / "text_encoder_3")
    return folder


def zimage_with_cut_weights(models, root: Path) -> Path:
    folder = root / "zimage_copy"
    shutil.copytree(models["zimage"], folder)
    weights = next((folder / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # a download cut short
    return folder


def sd3_file_without_text_encoders(models, root: Path) -> Path:
    return write_fake_sd3_checkpoint(root / "sd3.5_large_mmdit_only.safetensors", parts=False)


def zimage_single_file(models, root: Path) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    path = root / "z_image_turbo.safetensors"
    save_file({"model.diffusion_model.noise_refiner.0.attention.qkv.weight": np.zeros((6, 2), np.float16)}, str(path))
    return path


# (what is wrong, model (a key of `models` or a function making one in the test folder), make_dit_project's
#  arguments, words the one line must contain)
LORA_SD3 = {"network_module": "networks.lora_sd3"}
CASES = [
    ("SD3 folder without text_encoder_3", sd3_without_text_encoder_3, {}, "text_encoder_3/"),
    ("min_snr_gamma on Z-Image", "zimage", {"min_snr_gamma": 5.0}, "min_snr_gamma"),
    ("noise_offset on SD3", "sd3", {"noise_offset": 0.05}, "noise_offset"),
    ("text_encoder_lr on SD3", "sd3", {"text_encoder_lr": 4e-5}, "text_encoder_lr"),
    ("SD3 single file with the built-in trainer", "sd3_file", {}, "diffusers folder"),
    ("Z-Image single file with the built-in trainer", zimage_single_file, {}, "diffusers folder"),
    ("damaged Z-Image transformer weights", zimage_with_cut_weights, {}, "cannot be read"),
    ("train_network.py for SD3", "sd3_file", {"backend": "kohya", "script": "train_network.py", **LORA_SD3},
     "sd3_train_network.py"),
    ("networks.lora for SD3 with kohya", "sd3_file", {"backend": "kohya"}, "networks.lora_sd3"),
    ("SD3 diffusers folder with kohya", "sd3", {"backend": "kohya", **LORA_SD3}, ".safetensors"),
    ("missing clip_l with kohya", "sd3_file", {"backend": "kohya", "clip_l": "/nowhere/clip_l.safetensors",
                                               **LORA_SD3}, "/nowhere/clip_l.safetensors"),
    ("SD3 file without CLIP-L and no clip_l", sd3_file_without_text_encoders, {"backend": "kohya", **LORA_SD3},
     "holds no CLIP-L and clip_l is not set"),
    ("Z-Image with kohya", "zimage", {"backend": "kohya"}, "Z-Image is not in sd-scripts"),
    ("sd3_train_network.py for SD 1.x", TOY_MODEL, {"backend": "kohya", "min_snr_gamma": 5.0}, "train_network.py"),
    ("SD3-only key on SD 1.x", TOY_MODEL, {"weighting_scheme": "logit_normal"}, "weighting_scheme"),
]


def model_path(models, model, root: Path) -> Path:
    if isinstance(model, Path):
        return model
    return models[model] if isinstance(model, str) else model(models, root)


@pytest.mark.parametrize("name,model,options,named", CASES, ids=[c[0] for c in CASES])
def test_bad_dit_setup_stops_start_with_one_line_and_creates_nothing(models, tmp_path, monkeypatch, capsys,
                                                                     name, model, options, named):
    monkeypatch.chdir(tmp_path)
    cfg = make_dit_project(tmp_path / "p", model_path(models, model, tmp_path), **options)
    before = tree(tmp_path)
    assert main(["start", "--config", str(cfg), "--foreground"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora-search start: error:"), err
    assert named in err[0], err[0]
    assert tree(tmp_path) == before


def test_the_sd1_line_names_the_script_to_run_instead(models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = make_dit_project(tmp_path / "p", TOY_MODEL, backend="kohya", min_snr_gamma=5.0)
    assert main(["check", "--study", "--config-file", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "runs sd3_train_network.py, which does not train SD 1.x models; run train_network.py" in err, err


@pytest.mark.parametrize("family,shown", [("sd3", "SD3/SD3.5 diffusers folder"), ("zimage", "Z-Image diffusers folder")])
def test_tiny_dit_folders_pass_check_with_a_builtin_study(models, tmp_path, monkeypatch, capsys, family, shown):
    monkeypatch.chdir(tmp_path)
    cfg = make_dit_project(tmp_path / "p", models[family])
    before = tree(tmp_path)
    assert main(["check", "--study", "--config-file", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and f"ok  model: {models[family]} ({shown})" in out, out
    assert tree(tmp_path) == before


def test_sd3_single_file_passes_check_with_sd3_train_network(models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = make_dit_project(tmp_path / "p", models["sd3_file"], backend="kohya", **LORA_SD3)
    assert main(["check", "--study", "--config-file", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "(SD3/SD3.5 single file)" in out, out


def test_sd3_file_without_text_encoders_passes_when_their_files_are_given(models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parts = {key: str(write_fake_sd3_checkpoint(tmp_path / f"{key}.safetensors")) for key in ("clip_l", "clip_g",
                                                                                               "t5xxl", "vae")}
    model = sd3_file_without_text_encoders(models, tmp_path)
    cfg = make_dit_project(tmp_path / "p", model, backend="kohya", **LORA_SD3, **parts)
    assert main(["check", "--study", "--config-file", str(cfg)]) == 0, capsys.readouterr().err
    assert "all checks passed" in capsys.readouterr().out


@pytest.mark.parametrize("model,shown", [("sd3_file", "SD3/SD3.5 single file"), ("zimage", "Z-Image diffusers folder"),
                                         (TOY_MODEL, "SD 1.x diffusers folder")])
def test_check_and_plan_name_the_family(models, tmp_path, monkeypatch, capsys, model, shown):
    monkeypatch.chdir(tmp_path)
    make_dit_project(tmp_path / "p", model_path(models, model, tmp_path))
    base = tmp_path / "p" / "configs" / "base.toml"
    assert main(["check", str(base)]) in (0, 1)  # safe or not, the model line is there
    assert f"({shown})" in capsys.readouterr().out
    assert main(["plan", str(TOY_TRAIN), "--config", str(base)]) == 0
    assert f"({shown})" in capsys.readouterr().out


def test_checkpoint_family_reads_the_tensor_names(models, tmp_path):
    from training.models import ModelLoadError, checkpoint_family

    assert checkpoint_family(models["sd3_file"]) == "sd3"
    assert checkpoint_family(zimage_single_file(models, tmp_path)) == "zimage"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="junk.safetensors: cannot read the checkpoint"):
        checkpoint_family(junk)
