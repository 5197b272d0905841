"""``lora-search dashboard``: optuna-dashboard serves the study and its contact sheets, on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta

from search.cli import main
from search.dashboard import DashboardError, artifact_dir, is_loopback, make_dashboard_server
from search.scoring import make_scorer
from search.settings import load_settings
from search.worker import Worker
from study_fixtures import SheetScorer, make_project

optuna.logging.set_verbosity(optuna.logging.WARNING)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read()


@pytest.fixture
def study_settings(tmp_path, monkeypatch):
    """A study with one trained trial whose contact sheets the worker uploaded as artifacts."""
    monkeypatch.chdir(tmp_path)
    settings = load_settings(make_project(tmp_path, n_trials=1, epochs_choices=(2,)))
    worker = Worker(settings, scorer=SheetScorer(make_scorer(settings)))
    worker.run()
    trial = next(t for t in worker.study.get_trials() if t.value is not None)
    return settings, worker.study, trial


def test_dashboard_serves_the_study_and_its_artifacts(study_settings):
    settings, study, trial = study_settings
    artifact_id = next(a.artifact_id for a in get_all_artifact_meta(trial, storage=study._storage)
                       if a.filename.startswith("contact_sheet"))
    server = make_dashboard_server(settings, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        studies = json.loads(get(f"{base}/api/studies"))["study_summaries"]
        # the search, and the study where its finished trial is rated (one trial: nothing to compare yet)
        assert sorted(s["study_name"] for s in studies) == ["t", "t-ratings"]
        study_id = next(s["study_id"] for s in studies if s["study_name"] == "t")
        detail = json.loads(get(f"{base}/api/studies/{study_id}"))
        shown = {t["number"]: t for t in detail["trials"]}
        assert len(shown) == len(study.trials)
        attrs = {a["key"]: a["value"] for a in shown[trial.number]["user_attrs"]}
        assert "best_epoch" in attrs and "epoch_scores" in attrs  # per-epoch scores and best epoch are visible
        assert len(shown[trial.number]["intermediate_values"]) == len(trial.intermediate_values)
        image = get(f"{base}/artifacts/{study_id}/{trial._trial_id}/{artifact_id}")
        assert image.startswith(b"\x89PNG")  # the contact sheet comes from runs/<study>/artifacts
        assert (artifact_dir(settings) / artifact_id).is_file()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_dashboard_cli_binds_loopback_and_stops_on_ctrl_c(study_settings, tmp_path):
    cfg = tmp_path / "configs" / "study.toml"
    proc = subprocess.Popen([sys.executable, "-m", "search", "dashboard", "--config", str(cfg), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split("at ", 1)[1].split()[0]
        port = int(url.split(":")[2].split("/")[0])
        assert b"study_name" in get(f"http://127.0.0.1:{port}/api/studies")
        assert get(url)  # the dashboard page itself
        proc.send_signal(2)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_input_is_one_line(study_settings, tmp_path, capsys):
    settings = study_settings[0]
    cfg = str(tmp_path / "configs" / "study.toml")
    assert main(["dashboard", "--config", cfg, "--study", "nope", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no study named 'nope'" in err and len(err.splitlines()) == 1
    busy = make_dashboard_server(settings, "127.0.0.1", 0)
    try:
        with pytest.raises(DashboardError, match=f"port {busy.server_port} .* in use; pass another --port"):
            make_dashboard_server(settings, "127.0.0.1", busy.server_port)
    finally:
        busy.server_close()


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
