"""Crash recovery: a worker killed with SIGKILL mid-trial; resume finishes the study without losing it."""

from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest
from optuna.trial import TrialState

from search.cli import main
from search.settings import load_settings
from search.study import open_study
from search.worker import Worker, trained_count
from study_fixtures import REPO, make_project


def test_kill_9_mid_evaluation_then_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = make_project(tmp_path, n_trials=2, epochs_choices=(2,))
    marker = tmp_path / "scoring"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_SCORE_HANG_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "search", "worker", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # the worker dies while its scorer is evaluating epoch 1
    proc.wait()
    assert main(["resume", "--config", str(cfg), "--no-workers"]) == 0
    assert "re-queued 1 trial(s)" in capsys.readouterr().out
    Worker(load_settings(cfg)).run()
    study = open_study(load_settings(cfg), create=False)
    assert trained_count(study) == 2
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert all(t.state == TrialState.COMPLETE for t in study.get_trials() if t.user_attrs.get("accepted")
               and t.state != TrialState.FAIL)


@pytest.mark.parametrize("storage", ["", "journal:{root}/runs/journal.log"])
def test_kill_9_mid_trial_then_resume(tmp_path, monkeypatch, storage, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = make_project(tmp_path, n_trials=3, storage=storage.format(root=tmp_path), epochs_choices=(4,))
    env = {**os.environ, "FAKE_EPOCH_SECONDS": "0.6", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "search", "worker", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    settings = load_settings(cfg)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill it once its first trial has scored an epoch
        time.sleep(0.2)
        if (tmp_path / "runs" / "t").exists():
            running = open_study(settings).get_trials(states=(TrialState.RUNNING,))
            if running and running[0].intermediate_values:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    study = open_study(settings, create=False)
    [stuck] = study.get_trials(states=(TrialState.RUNNING,))
    scored_before = dict(stuck.intermediate_values)
    assert scored_before  # it had reported epochs before it died

    assert main(["resume", "--config", str(cfg), "--no-workers"]) == 0
    assert f"re-queued 1 trial(s) of dead workers to continue: {stuck.number}" in capsys.readouterr().out
    assert main(["resume", "--config", str(cfg), "--no-workers"]) == 0  # a second resume changes nothing
    assert "no trial of a dead worker found" in capsys.readouterr().out

    monkeypatch.setenv("FAKE_EPOCH_SECONDS", "0.01")
    Worker(settings).run()
    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert trained_count(study) == 3
    original = next(t for t in trials if t.number == stuck.number)
    assert original.state == TrialState.FAIL
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == stuck.number]
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["run_dir"] == original.user_attrs["run_dir"]  # continued in the same folder
    assert retry.params == original.params
    for epoch, value in scored_before.items():  # epochs scored before the crash are kept
        assert retry.intermediate_values[epoch] == value
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 3


def test_resume_on_a_healthy_study_changes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = make_project(tmp_path, n_trials=2)
    Worker(load_settings(cfg)).run()
    study = open_study(load_settings(cfg), create=False)
    before = [(t.number, t.state, t.value) for t in study.get_trials()]
    assert main(["resume", "--config", str(cfg), "--socket-name", f"lora-search-test-{os.getpid()}"]) == 0
    assert "has met its budget; no workers to restart" in capsys.readouterr().out
    assert [(t.number, t.state, t.value) for t in study.get_trials()] == before


def test_interrupted_trial_is_queued_and_continued_by_the_next_worker(tmp_path, monkeypatch):
    from search.scoring import CheckpointScorer, EpochScore

    class StopAtEpoch2(CheckpointScorer):
        def score(self, run_dir, config_path, epoch, checkpoint):
            if epoch == 2:
                raise KeyboardInterrupt  # what Ctrl-C / lora-search stop does mid-trial
            return EpochScore(epoch, 0.1 * epoch)

    monkeypatch.chdir(tmp_path)
    cfg = make_project(tmp_path, n_trials=2, epochs_choices=(4,))
    settings = load_settings(cfg)
    with pytest.raises(KeyboardInterrupt):
        Worker(settings, scorer=StopAtEpoch2()).run()
    study = open_study(settings, create=False)
    [stopped] = [t for t in study.get_trials() if t.user_attrs.get("accepted") and t.state == TrialState.FAIL]
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["fail_reason"] == "interrupted; queued to continue"
    assert stopped.intermediate_values == {1: 0.1}
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1

    Worker(settings).run()
    trials = study.get_trials()
    assert trained_count(study) == 2 and not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == stopped.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["run_dir"] == stopped.user_attrs["run_dir"]
    assert retry.intermediate_values[1] == 0.1  # the epoch scored before the stop is kept


def test_ctrl_c_before_training_leaves_nothing_running(tmp_path, monkeypatch):
    import search.worker as worker_module

    monkeypatch.chdir(tmp_path)
    cfg = make_project(tmp_path, n_trials=2)
    settings = load_settings(cfg)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(worker_module, "trial_values", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Worker(settings).run()
    [trial] = open_study(settings, create=False).get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == "interrupted before training"


def test_requested_stop_finishes_the_epoch_and_queues_the_trial(tmp_path, monkeypatch):
    from search.scoring import CheckpointScorer, EpochScore
    from search.status import status_text

    seen = []

    class StopDuringEpoch2(CheckpointScorer):
        def score(self, run_dir, config_path, epoch, checkpoint):
            seen.append(status_text(worker.study, 2))
            if epoch == 2:
                worker.request_stop()  # what the first Ctrl-C / SIGTERM does
            return EpochScore(epoch, 0.1 * epoch)

    monkeypatch.chdir(tmp_path)
    settings = load_settings(make_project(tmp_path, n_trials=2, epochs_choices=(4,)))
    worker = Worker(settings, scorer=StopDuringEpoch2())
    assert worker.run() == 0  # returns cleanly instead of raising
    study = open_study(settings, create=False)
    [stopped] = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert stopped.intermediate_values == {1: 0.1, 2: 0.2}  # the epoch in progress was finished and scored
    assert stopped.user_attrs["fail_reason"] == "interrupted; queued to continue"
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1
    assert "epoch 2/4" in seen[1] and "last 0.1000" in seen[1] and "ETA" in seen[1]  # status of a running trial
    assert (Path(stopped.user_attrs["run_dir"]) / "train.log").read_text().count("trial ") >= 1


@pytest.mark.slow
def test_builtin_trainer_retry_continues_from_the_saved_state(tmp_path, monkeypatch, capsys):
    """kill -9 a worker training with the real (tiny) trainer; the retry resumes, it does not restart."""
    from search.demo import SAFE_PARAMS, prepare

    monkeypatch.chdir(tmp_path)
    paths = prepare(tmp_path / "demo", n_trials=1, say=lambda _: None)
    settings = load_settings(paths.study_config)
    open_study(settings).enqueue_trial({**SAFE_PARAMS, "max_train_epochs": 4})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "search", "worker", "--config", str(paths.study_config)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        running = open_study(settings).get_trials(states=(TrialState.RUNNING,))
        # kill it after epoch 2 is saved, ideally while epoch 2 is being scored
        if running and running[0].user_attrs.get("progress", {}).get("epoch", 0) >= 2:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["resume", "--config", str(paths.study_config), "--no-workers"]) == 0
    Worker(settings).run()
    study = open_study(settings, create=False)
    [retry] = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") is not None]
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["progress"]["first_epoch"] >= 3  # it went on from the saved epoch
    assert sorted(retry.intermediate_values) == [1, 2, 3, 4]  # an epoch saved but not yet scored is scored too
    log = (Path(retry.user_attrs["run_dir"]) / "train.log").read_text()
    assert "resuming from" in log
    scores = json.loads((Path(retry.user_attrs["run_dir"]) / "scores.json").read_text())
    assert [e["epoch"] for e in scores["epochs"]] == [1, 2, 3, 4]  # scores.json keeps the crashed run's epochs
