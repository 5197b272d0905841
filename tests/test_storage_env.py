"""``$LORA_SEARCH_STORAGE``: the storage URL every subcommand uses unless ``--storage`` names another."""

from __future__ import annotations

import optuna
import pytest

from search.cli import build_parser, main
from search.cli._common import settings_from_args
from search.settings import load_settings
from search.study import open_study, storage_url
from search.tmux import STORAGE_ENV
from search.worker import trained_count
from study_fixtures import make_project

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    monkeypatch.setenv("FAKE_TRAIN_LOG", str(tmp_path / "trained.log"))
    return tmp_path


def storage_for(argv: list[str]) -> str:
    return storage_url(settings_from_args(build_parser().parse_args(argv)))


@pytest.mark.parametrize("command", ["worker", "status", "start", "export"])
def test_flag_beats_variable_beats_config(project, monkeypatch, command):
    cfg = make_project(project, storage=f"sqlite:///{project / 'config.db'}")
    args = [command, "--config", str(cfg)] + (["--out", "x.toml"] if command == "export" else [])
    assert storage_for(args) == f"sqlite:///{project / 'config.db'}"
    monkeypatch.setenv(STORAGE_ENV, f"sqlite:///{project / 'env.db'}")
    assert storage_for(args) == f"sqlite:///{project / 'env.db'}"
    assert storage_for(args + ["--storage", f"sqlite:///{project / 'flag.db'}"]) == f"sqlite:///{project / 'flag.db'}"
    monkeypatch.setenv(STORAGE_ENV, "")  # set but empty, as in a tmux window of a study on the default storage
    assert storage_for(args) == f"sqlite:///{project / 'config.db'}"


def test_worker_trains_in_the_study_the_variable_names(project, monkeypatch, capsys):
    cfg = make_project(project, n_trials=1)  # the config names no storage: SQLite under runs/
    journal = f"journal:{project / 'from-env.journal'}"
    monkeypatch.setenv(STORAGE_ENV, journal)
    assert main(["worker", "--config", str(cfg)]) == 0
    assert "has 1 of 1 trained" in capsys.readouterr().out
    assert trained_count(open_study(load_settings(cfg, storage=journal), create=False)) == 1
    assert not (project / "runs" / "t" / "study.db").exists()
