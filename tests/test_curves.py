"""A trained trial's curves: score events in its TensorBoard log, loss/LR and score plots in the dashboard."""

from __future__ import annotations

import json
import threading
import urllib.request

import optuna
import pytest
from PIL import Image

from search.curves import plot_curves, plot_scores, read_scalars
from search.dashboard import make_dashboard_server
from search.scoring import make_scorer
from search.settings import load_settings
from search.worker import Worker
from study_fixtures import SheetScorer, make_project

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """One trial trained for 3 epochs by the kohya backend (the fake logs to TensorBoard like sd-scripts)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_TB", "1")
    settings = load_settings(make_project(tmp_path, n_trials=1, epochs_choices=(3,)))
    worker = Worker(settings, scorer=SheetScorer(make_scorer(settings), lambda epoch: {"identity": 0.1 * epoch, "style": 0.5}))
    worker.run()
    trial = next(t for t in worker.study.get_trials() if t.value is not None)
    return settings, worker.study, trial


def dashboard_trial(settings, study, number: int) -> dict:
    """The trial as the dashboard's study API hands it to the browser."""
    server = make_dashboard_server(settings, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/api/studies/{study._study_id}"
        with urllib.request.urlopen(url, timeout=10) as response:
            detail = json.loads(response.read())
        return next(t for t in detail["trials"] if t["number"] == number)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_dashboard_shows_one_current_curves_and_scores_plot_per_trial(trained):
    settings, study, trial = trained
    shown = dashboard_trial(settings, study, trial.number)
    names = sorted(a["filename"] for a in shown["artifacts"])
    # refreshed after every epoch, yet one of each: each is rewritten in place
    assert names.count("curves.png") == 1 and names.count("scores.png") == 1
    assert names.count("contact_sheet_e3.png") == 1
    store = settings.study_dir / "artifacts"
    curves_id = next(a["artifact_id"] for a in shown["artifacts"] if a["filename"] == "curves.png")
    assert Image.open(store / curves_id).size == (800, 600)
    sizes = [Image.open(p).size for p in store.iterdir()]
    assert sizes.count((800, 600)) == 1 and sizes.count((800, 360)) == 1  # no stale copies left behind
    run_dir = settings.study_dir / f"trial_{trial.number:04d}"
    assert (run_dir / "curves.png").read_bytes() == (store / curves_id).read_bytes()  # the last epoch's


def test_scores_and_kohya_curves_share_the_trials_log_folder(trained):
    settings, study, trial = trained
    logs = settings.study_dir / f"trial_{trial.number:04d}" / "logs"
    scalars = read_scalars(logs)
    assert [step for step, _ in scalars["score/total"]] == [1, 2, 3]
    assert [round(v, 6) for _, v in scalars["score/identity"]] == [0.1, 0.2, 0.3]
    assert [step for step, _ in scalars["loss/current"]] == list(range(1, 10))  # sd-scripts' own, below logs/
    assert {"lr/unet", "lr/textencoder"} <= set(scalars)
    assert list(logs.glob("*/network_train/events.out.tfevents.*"))


def test_plots_say_nothing_when_there_is_nothing(tmp_path):
    assert plot_curves({}, "t", tmp_path / "c.png") is None
    assert plot_scores({}, {}, None, "t", tmp_path / "s.png") is None
    assert not list(tmp_path.iterdir())
    drawn = plot_scores({"1": 0.3, "2": 0.5}, {1: {"identity": 0.1}, 2: {"identity": 0.4}}, 2, "t", tmp_path / "s.png")
    assert Image.open(drawn).format == "PNG"


def test_tensorboard_command_shows_every_trial_as_a_run(trained, tmp_path):
    import subprocess
    import sys
    import time

    settings, study, trial = trained
    proc = subprocess.Popen([sys.executable, "-m", "search", "tensorboard", "--config",
                             str(tmp_path / "configs" / "study.toml"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" at ", 1)[1].split()[0].rstrip("/")
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline:  # TensorBoard loads the logs in the background after it starts
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=10) as response:
                tags = json.loads(response.read())
            if any("score/total" in t for t in tags.values()) and any("loss/current" in t for t in tags.values()):
                break
            time.sleep(0.5)
        run = f"trial_{trial.number:04d}/logs"
        assert "score/total" in tags[run]  # the worker's scores: the trial's own run
        assert any(name.startswith(run + "/") and "lr/unet" in t for name, t in tags.items())  # sd-scripts' run
    finally:
        proc.send_signal(2)
        try:
            proc.wait(20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
