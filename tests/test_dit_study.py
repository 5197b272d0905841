"""A 3-trial study on a tiny SD3 and a tiny Z-Image model: the shipped DiT base config and search space,
the built-in trainer, every epoch sampled and scored by the CLIP evaluator (the toy world's CLIP and
character), and ``export`` of the best trial as a config that trains again."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w
from optuna.trial import TrialState
from safetensors import safe_open

from dit_fixtures import one_torch_thread  # noqa: F401  (autouse)
from search.cli import main
from search.demo import DemoPaths, copy_dataset, toy_evaluator_config
from search.export import export_trial
from search.settings import load_settings
from search.study import open_study
from search.worker import Worker
from study_fixtures import REPO
from toyworld import world
from training.config import load_training_config
from training.families import check_family_config
from training.tiny_dit import save_tiny_sd3, save_tiny_zimage

N_TRIALS = 3


def write_dit_study(root: Path, model: Path) -> Path:
    """The shipped configs/dit base and space, pointed at ``model`` and the toy character, shrunk to CPU size."""
    paths = DemoPaths(root)
    copy_dataset(paths)
    configs = paths.configs
    configs.mkdir(parents=True)
    (configs / "prompts.txt").write_text(
        "".join(f"{{trigger}}, {bg} background --w {world.SIZE} --h {world.SIZE} --d {i} --s 3\n"
                for i, bg in enumerate(("grass", "snow"))))
    base = tomllib.loads((REPO / "configs" / "dit" / "base.toml").read_text())
    base["model"].update(pretrained_model_name_or_path=str(model), fp8_base=False)
    base["training"].update(mixed_precision="no", gradient_checkpointing=False, max_data_loader_n_workers=0,
                            save_precision="float")
    base["dataset"].update(train_data_dir=str(paths.train), resolution=str(world.SIZE), enable_bucket=False)
    base["saving"].update(output_dir=str(root / "train"), save_every_n_epochs=1, sample_every_n_epochs=1,
                          sample_prompts=str(configs / "prompts.txt"), metadata_trigger_phrase=world.TRIGGER)
    (configs / "base.toml").write_text(tomli_w.dumps(base))
    space = tomllib.loads((REPO / "configs" / "dit" / "search_space.toml").read_text())
    space["max_train_epochs"] = {"choices": [2]}
    space["network_dim"] = {"choices": [4, 8]}
    space["network_alpha_ratio"] = {"low": 0.25, "high": 0.5, "step": 0.25}  # constraint 6 wants 16+ epochs above
    space["gradient_accumulation_steps"] = {"value": 2}
    (configs / "search_space.toml").write_text(tomli_w.dumps(space))
    (configs / "evaluator.toml").write_text(tomli_w.dumps(toy_evaluator_config(paths)))
    # gpu_memory_gb: the VRAM estimate is for the published model (SD3.5 Large, Z-Image 6B) in float32
    study = {"study": {"name": "dit", "n_trials": N_TRIALS, "runs_dir": str(root), "seed": 3, "gpu_memory_gb": 80,
                       "base_config": str(configs / "base.toml"), "search_space": str(configs / "search_space.toml"),
                       "evaluator_config": str(configs / "evaluator.toml")},
             "backend": {"type": "builtin"}, "scorer": {"type": "clip"}}
    paths.study_config.write_text(tomli_w.dumps(study))
    return paths.study_config


@pytest.mark.parametrize("name", ["sd3", "zimage"])
def test_a_study_on_a_dit_trains_scores_and_exports(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = (save_tiny_sd3 if name == "sd3" else save_tiny_zimage)(tmp_path / "model")
    study_config = write_dit_study(tmp_path / "study", model)
    assert main(["check", "--study", "--config-file", str(study_config)]) == 0, capsys.readouterr().err
    settings = load_settings(study_config)
    worker = Worker(settings, study=open_study(settings, seed_offset=0))
    worker.run()
    trained = [t for t in worker.study.get_trials() if "accepted" in t.user_attrs]
    assert len(trained) == N_TRIALS and all(t.state == TrialState.COMPLETE for t in trained)
    for trial in trained:
        assert sorted(trial.intermediate_values) == [1, 2]  # both epochs sampled and scored
        assert all(0.0 <= v <= 1.0 for v in trial.intermediate_values.values())
        with safe_open(trial.user_attrs["best_checkpoint"], framework="pt") as fh:
            keys = list(fh.keys())
        assert keys and all(k.startswith("transformer." if name == "sd3" else "diffusion_model.") for k in keys)
    assert len({round(t.value, 6) for t in trained}) > 1  # different hyperparameters, different scores

    out = tmp_path / "best.toml"
    best = export_trial(worker.study, worker.base, out)
    assert best.value == max(t.value for t in trained)
    exported = load_training_config(out)
    check_family_config(exported, name, builtin=True)
    assert main(["check", str(out)]) == 0  # safe under the seven constraints, as the study found it
    assert exported.learning_rate == best.params["learning_rate"]
    assert exported.network_dim == best.params["network_dim"]
    assert exported.weighting_scheme == best.params["weighting_scheme"]
