"""A study on an SD3 single file with the kohya backend running sd3_train_network.py (a fake one that parses
its config strictly against sd-scripts' train_network.py + SD3 argument names) and a command scorer."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import optuna
import pytest
import tomli_w
from optuna.trial import TrialState

from search.cli import main
from search.settings import load_settings
from search.study import open_study
from search.worker import trained_count
from study_fixtures import FAKE, make_dit_project, write_fake_sd3_checkpoint

optuna.logging.set_verbosity(optuna.logging.WARNING)
SD3_VALUES = {"network_module": "networks.lora_sd3", "weighting_scheme": "logit_normal", "training_shift": 3.0,
              "t5xxl_max_token_length": 154, "fp8_base": True}


def run_fake_sd3(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FAKE / "sd3_train_network.py"), "--config_file", str(config)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = write_fake_sd3_checkpoint(tmp_path / "sd3.5_large.safetensors")
    study = make_dit_project(tmp_path, model, backend="kohya", n_trials=3, **SD3_VALUES)
    settings = tomllib.loads(study.read_text())
    settings["study"]["gpu_memory_gb"] = 80  # SD3.5 Large at the space's ranks is estimated well over 16 GiB
    study.write_text(tomli_w.dumps(settings))
    return study


def test_a_three_trial_sd3_study_completes_and_exports_a_config_sd3_train_network_takes(project, tmp_path, capsys):
    assert main(["start", "--config", str(project), "--foreground"]) == 0
    assert "ok  model: " in capsys.readouterr().out  # the pre-flight check ran and passed
    study = open_study(load_settings(project))
    trained = [t for t in study.get_trials() if t.user_attrs.get("accepted")]
    assert trained_count(study) == 3 and len(trained) == 3
    for trial in trained:
        assert trial.state == TrialState.COMPLETE, trial.user_attrs
        run_dir = Path(trial.user_attrs["run_dir"])
        epochs = trial.user_attrs["config"]["max_train_epochs"]
        # every epoch's checkpoint was found and scored, the last one from {output_name}.safetensors
        assert sorted(trial.intermediate_values) == list(range(1, epochs + 1))
        assert (run_dir / "lora.safetensors").is_file() and (run_dir / "lora-000001.safetensors").is_file()
        written = tomllib.loads((run_dir / "config.toml").read_text())
        flat = {k: v for section in written.values() for k, v in section.items()}
        assert {key: flat[key] for key in SD3_VALUES} == SD3_VALUES
        assert "sd3_train_network.py: error" not in (run_dir / "train.log").read_text()

    best = tmp_path / "best.toml"
    assert main(["export", "--config", str(project), "--out", str(best)]) == 0
    exported = {k: v for section in tomllib.loads(best.read_text()).values() for k, v in section.items()}
    assert {key: exported[key] for key in SD3_VALUES} == SD3_VALUES
    (tmp_path / exported["output_dir"]).mkdir(parents=True)
    done = run_fake_sd3(best, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / exported["output_dir"] / "lora.safetensors").is_file()


@pytest.mark.parametrize("change,named", [({"lora_dim": 8}, "unrecognized arguments"),
                                          ({"network_module": "networks.lora"}, "networks.lora_sd3"),
                                          ({"pretrained_model_name_or_path": "model_folder"}, ".safetensors")])
def test_the_fake_sd3_script_refuses_what_sd3_train_network_would(project, tmp_path, change, named):
    base = tomllib.loads((tmp_path / "configs" / "base.toml").read_text())
    section = base["network"] if "network_module" in change else base["model"]
    section.update(change)
    config = tmp_path / "bad.toml"
    config.write_text(tomli_w.dumps(base))
    done = run_fake_sd3(config, tmp_path)
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert not list(tmp_path.rglob("lora*.safetensors"))
