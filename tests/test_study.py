"""The study end to end with the kohya backend (a fake sd-scripts) and a command scorer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.cli import main
from search.settings import load_settings
from search.study import open_study
from search.worker import Worker, trained_count
from pg_server import postgres_server  # noqa: F401  (fixture)
from study_fixtures import make_project

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_TRAIN_LOG", str(tmp_path / "trained.log"))
    return tmp_path


def trained_dirs(root: Path) -> list[str]:
    log = root / "trained.log"
    return log.read_text().split() if log.exists() else []


def test_worker_trains_budget_and_rejections_cost_nothing(project):
    cfg = make_project(project, n_trials=6)
    settings = load_settings(cfg)
    worker = Worker(settings)
    assert worker.run() == 6
    trials = worker.study.get_trials()
    trained = [t for t in trials if t.user_attrs.get("accepted")]
    rejected = [t for t in trials if t.user_attrs.get("prune_reason") == "constraint"]
    assert len(trained) == 6 and trained_count(worker.study) == 6
    assert all(t.state == TrialState.COMPLETE for t in trained)
    assert len(trials) == len(trained) + len(rejected)
    for t in rejected:  # pruned before training: no folder, no intermediate values, reasons recorded
        assert t.state == TrialState.PRUNED and not t.intermediate_values
        assert t.user_attrs["constraints_violated"] and t.user_attrs["constraint_reasons"][0].startswith("constraint ")
        assert not (project / "runs" / "t" / f"trial_{t.number:04d}").exists()
    assert sorted(trained_dirs(project)) == sorted(t.user_attrs["run_dir"] for t in trained)
    best = worker.study.best_trial
    epochs = best.user_attrs["config"]["max_train_epochs"]
    # every epoch was scored (save_every_n_epochs = 1, the last one from the final file)
    assert sorted(best.intermediate_values) == list(range(1, epochs + 1))
    assert best.user_attrs["best_epoch"] == epochs  # the fake scorer prefers later epochs
    assert best.value == pytest.approx(max(best.intermediate_values.values()))
    # the dashboard shows a note on each trial saying what happened, above the raw attributes
    from optuna_dashboard._note import get_note_from_system_attrs

    notes = worker.study._storage.get_study_system_attrs(worker.study._study_id)
    best_note = get_note_from_system_attrs(notes, best._trial_id)["body"]
    assert "**complete**" in best_note and f"best epoch **{epochs}**" in best_note and "| epoch | score |" in best_note
    for t in rejected:
        note = get_note_from_system_attrs(notes, t._trial_id)["body"]
        assert "Rejected before training" in note and t.user_attrs["constraint_reasons"][0] in note


def test_trial_config_is_base_plus_params(project):
    cfg = make_project(project, n_trials=1)
    worker = Worker(load_settings(cfg))
    worker.run()
    trial = next(t for t in worker.study.get_trials() if t.state == TrialState.COMPLETE)
    from training.config import load_training_config

    written = load_training_config(Path(trial.user_attrs["run_dir"]) / "config.toml")
    p = trial.params
    assert written.network_dim == p["network_dim"]
    assert written.network_alpha == int(round(p["network_dim"] * p["network_alpha_ratio"], 6))
    assert written.unet_lr == written.learning_rate == pytest.approx(p["learning_rate"])
    assert written.text_encoder_lr == pytest.approx(p["text_encoder_lr"])
    assert written.output_dir == trial.user_attrs["run_dir"]
    assert written.mixed_precision == "bf16" and written.noise_offset == 0.05  # from the base config


def test_failed_training_is_recorded_and_the_worker_goes_on(project, monkeypatch):
    cfg = make_project(project, n_trials=3)
    monkeypatch.setenv("FAKE_TRAIN_FAIL", "trial_")  # every training crashes
    worker = Worker(load_settings(cfg))
    assert worker.run() == 3  # a failed trial does not stop the worker
    trained = [t for t in worker.study.get_trials() if t.user_attrs.get("accepted")]
    assert len(trained) == 3 and all(t.state == TrialState.FAIL for t in trained)
    assert all("exited with code 3" in t.user_attrs["fail_reason"] for t in trained)


def test_quality_pruning_stops_a_trial(project):
    from search.scoring import CheckpointScorer, EpochScore

    class Falling(CheckpointScorer):
        """First trial scores well; later ones score badly, so the median pruner stops them."""

        def score(self, run_dir, config_path, epoch, checkpoint):
            good = run_dir.name == "trial_0000" or trained_count(worker.study) <= 2
            return EpochScore(epoch, 1.0 if good else 0.0)

    cfg = make_project(project, n_trials=4, epochs_choices=(4,))
    settings = load_settings(cfg)
    settings.pruner.type = "median"
    settings.pruner.n_startup_trials = 1
    settings.pruner.n_warmup_steps = 0
    worker = Worker(settings, scorer=Falling())
    worker.run()
    pruned = [t for t in worker.study.get_trials() if t.user_attrs.get("prune_reason") == "quality"]
    assert pruned and all(t.state == TrialState.PRUNED for t in pruned)
    assert all(len(t.intermediate_values) < 4 for t in pruned)
    assert trained_count(worker.study) == 4


def run_workers(cfg: Path, env: dict, count: int = 2) -> None:
    cmd = [sys.executable, "-m", "search", "worker", "--config", str(cfg)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(count)]
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out


@pytest.mark.parametrize("engine", ["sqlite", "journal", "postgresql"])
def test_two_workers_share_the_budget(project, engine, request):
    """The same budget semantics on each storage; PostgreSQL is the multi-machine engine (a real server)."""
    storage = {"sqlite": "", "journal": f"journal:{project}/runs/journal.log"}.get(engine)
    if storage is None:
        storage = request.getfixturevalue("postgres_server")()
    cfg = make_project(project, n_trials=6, storage=storage)
    env = {**os.environ, "FAKE_EPOCH_SECONDS": "0.05", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run_workers(cfg, env)
    study = open_study(load_settings(cfg), create=False)
    trials = study.get_trials()
    assert trained_count(study) == 6
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    dirs = trained_dirs(project)
    assert len(dirs) == len(set(dirs)) == 6  # no trial trained twice
    workers = {t.user_attrs["worker"] for t in trials if t.user_attrs.get("accepted")}
    assert len(workers) == 2  # both really worked


def test_export_writes_the_best_trial_and_it_passes_check(project, capsys):
    cfg = make_project(project, n_trials=3)
    worker = Worker(load_settings(cfg))
    worker.run()
    out = project / "best.toml"
    assert main(["export", "--config", str(cfg), "--out", str(out)]) == 0
    best = worker.study.best_trial
    from training.config import load_training_config

    exported = load_training_config(out)
    assert exported.network_dim == best.params["network_dim"]
    assert exported.learning_rate == pytest.approx(best.params["learning_rate"])
    assert exported.output_dir == "runs/train"  # production output paths, not the trial folder
    text = out.read_text()
    assert f"trial {best.number}" in text and "best epoch" in text
    assert main(["check", str(out)]) == 0
    assert main(["export", "--config", str(cfg), "--out", str(out), "--trial", "999"]) == 2
    assert "has no trial 999" in capsys.readouterr().err


def test_export_refuses_a_rejected_trial_and_an_empty_study(project, capsys):
    cfg = make_project(project, n_trials=2)
    worker = Worker(load_settings(cfg))
    out = project / "x.toml"
    assert main(["export", "--config", str(cfg), "--out", str(out)]) == 2
    assert "no complete trial" in capsys.readouterr().err and not out.exists()
    worker.run()
    rejected = [t for t in worker.study.get_trials() if t.user_attrs.get("prune_reason") == "constraint"]
    if rejected:
        assert main(["export", "--config", str(cfg), "--out", str(out), "--trial", str(rejected[0].number)]) == 2
        assert "never trained" in capsys.readouterr().err


def test_status_table(project, capsys):
    cfg = make_project(project, n_trials=5)
    worker = Worker(load_settings(cfg))
    worker.run()
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "5 of 5 trials trained" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("trial"))
    assert "state" in header and "score" in header and "note" in header and "vram_gib" in header
    assert "workers: no tmux session" in out
    rejected = [t for t in worker.study.get_trials() if t.user_attrs.get("prune_reason") == "constraint"]
    assert f"constraint rejections: {len(rejected)} trial(s)" in out
    for t in rejected:
        row = next(line for line in lines if line.split()[:1] == [str(t.number)])
        assert "PRUNED" in row and "rejected: constraint" in row
    assert f"best: trial {worker.study.best_trial.number}" in out


def test_status_of_a_missing_study_is_one_clear_line(project, capsys):
    cfg = make_project(project)
    assert main(["status", "--config", str(cfg), "--study", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no study named 'nope'" in err and len(err.splitlines()) == 1


def test_bad_storage_url_is_one_clear_line(project, capsys):
    cfg = make_project(project)
    assert main(["status", "--config", str(cfg), "--storage", "redis://x"]) == 2
    assert "storage URL 'redis://x' is not understood" in capsys.readouterr().err
    assert main(["status", "--config", str(cfg), "--storage", "postgresql://u:secret@127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err
    assert "cannot open storage" in err and "secret" not in err


def test_configs_over_the_gpu_budget_are_rejected_before_training(project):
    import tomllib
    import tomli_w

    cfg = make_project(project, n_trials=3)
    space_path = project / "configs" / "search_space.toml"
    space = tomllib.loads(space_path.read_text())
    space["train_batch_size"] = {"choices": [1, 8]}  # batch 8 at 512px needs far more than 10 GB
    space_path.write_text(tomli_w.dumps(space))
    settings = load_settings(cfg)
    settings.study.gpu_memory_gb = 10
    worker = Worker(settings)
    safe = {"network_dim": 64, "network_alpha_ratio": 0.5, "network_dropout": 0.1, "learning_rate": 8e-5,
            "text_encoder_lr": 4e-5, "lr_scheduler": "cosine", "max_train_epochs": 2, "min_snr_gamma": 5,
            "optimizer_type": "AdamW", "gradient_accumulation_steps": 2, "lr_warmup_steps": 100}
    worker.study.enqueue_trial({**safe, "train_batch_size": 8})  # sampled first: surely over the budget
    worker.run()
    trials = worker.study.get_trials()
    over = [t for t in trials if t.user_attrs.get("prune_reason") == "vram"]
    assert over and all(t.params["train_batch_size"] == 8 and t.state == TrialState.PRUNED for t in over)
    assert all(t.user_attrs["vram_estimate_gib"] > 10 for t in over)
    assert "exceeds gpu_memory_gb = 10" in over[0].user_attrs["constraint_reasons"][0]
    trained = [t for t in trials if t.user_attrs.get("accepted")]
    assert len(trained) == 3 and all(t.params["train_batch_size"] == 1 for t in trained)
    assert not any((project / "runs" / "t" / f"trial_{t.number:04d}").exists() for t in over)


def test_out_of_memory_inside_a_trial_is_pruned_and_the_study_goes_on(project):
    from search.scoring import CheckpointScorer, EpochScore

    class OomOnce(CheckpointScorer):
        calls = 0

        def score(self, run_dir, config_path, epoch, checkpoint):
            OomOnce.calls += 1
            if OomOnce.calls == 1:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return EpochScore(epoch, 0.5)

    worker = Worker(load_settings(make_project(project, n_trials=3)), scorer=OomOnce())
    worker.run()
    trained = [t for t in worker.study.get_trials() if t.user_attrs.get("accepted")]
    assert len(trained) == 3
    oom = trained[0]
    assert oom.state == TrialState.PRUNED and oom.user_attrs["prune_reason"] == "oom"
    assert "out of memory" in oom.user_attrs["fail_reason"]
    assert [t.state for t in trained[1:]] == [TrialState.COMPLETE, TrialState.COMPLETE]


def test_kohya_out_of_memory_exit_is_pruned(project, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_FAIL", "trial_0")
    monkeypatch.setenv("FAKE_TRAIN_FAIL_MESSAGE", "torch.OutOfMemoryError: CUDA out of memory.")
    worker = Worker(load_settings(make_project(project, n_trials=2)))
    worker.run()
    pruned = [t for t in worker.study.get_trials() if t.user_attrs.get("prune_reason") == "oom"]
    assert pruned and all(t.state == TrialState.PRUNED for t in pruned)


def test_a_space_that_only_yields_rejections_stops_with_a_clear_error(project, monkeypatch):
    import search.worker as worker_module
    from search.errors import StudyError

    cfg = make_project(project, n_trials=2)
    settings = load_settings(cfg)
    settings.study.gpu_memory_gb = 0.5  # nothing fits
    monkeypatch.setattr(worker_module, "MAX_REJECTIONS_IN_A_ROW", 20)
    with pytest.raises(StudyError, match="20 sampled trials in a row were rejected"):
        Worker(settings).run()


def test_study_preset_is_laid_over_the_base_config(project):
    from training.presets import load_preset

    cfg = make_project(project, n_trials=1)
    settings = load_settings(cfg)
    settings.study.preset = "style"
    worker = Worker(settings)
    worker.run()
    trial = next(t for t in worker.study.get_trials() if t.user_attrs.get("accepted"))
    preset = load_preset("style")
    searched = set(trial.params) | {"network_alpha", "unet_lr"}
    for key, value in preset.items():
        if key not in searched:
            assert trial.user_attrs["config"][key] == value, key


def test_unknown_preset_is_one_clear_line(project, capsys):
    assert main(["train", str(project / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    base = Path(__file__).resolve().parents[1] / "configs" / "base.toml"
    assert main(["train", str(base), "--preset", "portrait"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown preset 'portrait'; available presets: character, concept, deturbo, style, turbo" in err and len(err.splitlines()) == 1
