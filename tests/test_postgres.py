"""Two workers on one PostgreSQL study: the budget holds and no trial trains twice."""

from __future__ import annotations

import os

from optuna.trial import TrialState

from pg_server import postgres_server  # noqa: F401  (fixture)
from search.settings import load_settings
from search.study import open_study
from search.worker import trained_count
from study_fixtures import REPO, make_project
from test_study import run_workers, trained_dirs


def test_two_workers_on_postgresql(tmp_path, monkeypatch, postgres_server):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    url = postgres_server()
    cfg = make_project(tmp_path, n_trials=6, storage=url)
    env = {**os.environ, "FAKE_EPOCH_SECONDS": "0.05", "PYTHONPATH": str(REPO),
           "FAKE_TRAIN_LOG": str(tmp_path / "trained.log")}
    run_workers(cfg, env)
    study = open_study(load_settings(cfg), create=False)
    trials = study.get_trials()
    assert trained_count(study) == 6
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    dirs = trained_dirs(tmp_path)
    assert len(dirs) == len(set(dirs)) == 6
    assert len({t.user_attrs["worker"] for t in trials if t.user_attrs.get("accepted")}) == 2
