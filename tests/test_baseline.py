"""The user's proven config as the first trial: mapped onto the space, checked, marked, compared."""

from __future__ import annotations

import tomllib

import optuna
import pytest
import tomli_w

from search.baseline import baseline_params, has_baseline, queue_baseline
from search.cli import main
from search.settings import load_settings
from search.space import load_search_space
from search.worker import Worker
from study_fixtures import REPO, make_project
from training.config import config_from_dict
from training.errors import ConfigError

optuna.logging.set_verbosity(optuna.logging.WARNING)

PROVEN = {"network_dim": 128, "network_alpha": 64, "learning_rate": 9e-5, "unet_lr": 9e-5, "text_encoder_lr": 4e-5,
          "lr_scheduler": "cosine", "max_train_epochs": 2, "optimizer_type": "AdamW", "gradient_accumulation_steps": 2,
          "lr_warmup_steps": 100, "min_snr_gamma": 5.0, "network_dropout": 0.1, "noise_offset": 0.07}


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def proven_file(root, **changes):
    base = tomllib.loads((REPO / "configs" / "base.toml").read_text())
    flat = {k: v for section in base.values() for k, v in section.items()}
    path = root / "my_proven.toml"
    path.write_text(tomli_w.dumps({**flat, **PROVEN, **changes}))
    return path


def test_the_baseline_trains_first_with_its_own_keys_and_every_trial_is_measured_against_it(project, capsys):
    cfg = make_project(project, n_trials=4, epochs_choices=(2,))
    settings = load_settings(cfg)
    settings.study.baseline_config = str(proven_file(project))
    worker = Worker(settings)
    worker.run()
    trials = worker.study.get_trials()
    first = trials[0]
    assert first.user_attrs["baseline"] is True and first.state.name == "COMPLETE"
    assert first.params["network_alpha_ratio"] == 0.5 and first.params["learning_rate"] == pytest.approx(9e-5)
    assert first.user_attrs["config"]["noise_offset"] == 0.07  # the proven config's own key, kept
    others = [t for t in trials[1:] if t.state.name == "COMPLETE"]
    assert others and all(t.user_attrs["config"]["noise_offset"] == 0.05 for t in others)  # base config
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1

    cfg.write_text(cfg.read_text().replace("[study]\n", f'[study]\nbaseline_config = "{settings.study.baseline_config}"\n'))
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("trial"))
    assert "vs_baseline" in header.split()
    row0 = next(line for line in out.splitlines() if line.split()[:1] == ["0"])
    assert "baseline (" in row0
    relative = f"{others[0].value - first.value:+.3f}"
    row = next(line for line in out.splitlines() if line.split()[:1] == [str(others[0].number)])
    assert relative in row.split()
    from optuna_dashboard._note import get_note_from_system_attrs  # the dashboard note says where it stands

    attrs = worker.study._storage.get_study_system_attrs(worker.study._study_id)
    assert f"{relative} vs baseline" in get_note_from_system_attrs(attrs, others[0]._trial_id)["body"]
    assert "baseline: your proven config" in get_note_from_system_attrs(attrs, first._trial_id)["body"]

    best = project / "best.toml"
    assert main(["export", "--config", str(cfg), "--out", str(best)]) == 0
    text = best.read_text()
    best_trial = worker.study.best_trial
    if best_trial.number == 0:
        assert "This is the baseline trial" in text
    else:
        assert f"{best_trial.value - first.value:+.3f} vs baseline" in text


def test_a_baseline_outside_the_space_is_one_clear_line(project, capsys):
    cfg = make_project(project, n_trials=1, epochs_choices=(2,))
    path = proven_file(project, learning_rate=2e-4, unet_lr=2e-4)
    assert main(["start", "--foreground", "--config", str(cfg), "--baseline", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "learning_rate = 0.0002 is outside the search space" in err and "widen the space or change the baseline" in err


def test_a_baseline_against_a_constraint_is_refused_with_the_constraint(project):
    cfg = make_project(project, n_trials=1, epochs_choices=(2,))
    settings = load_settings(cfg)
    # ratio 0.75 with 8-bit AdamW: constraint 6
    settings.study.baseline_config = str(proven_file(project, network_alpha=96, optimizer_type="AdamW8bit"))
    with pytest.raises(ConfigError, match="violates constraint 6"):
        Worker(settings)


def test_alpha_maps_to_the_ratio_of_the_grid_that_gives_it():
    space = load_search_space(REPO / "configs" / "search_space.toml")
    base = {**PROVEN, "max_train_epochs": 20}
    # int(64 * 0.85) = 54: alpha 54 at dim 64 is the space's ratio 0.85
    params = baseline_params(space, config_from_dict({**base, "network_dim": 64, "network_alpha": 54}), "p", "s")
    assert params["network_alpha_ratio"] == pytest.approx(0.85) and params["network_dim"] == 64
    with pytest.raises(ConfigError, match="network_alpha 55 at network_dim 64 is outside the search space"):
        baseline_params(space, config_from_dict({**base, "network_dim": 64, "network_alpha": 55}), "p", "s")
    with pytest.raises(ConfigError, match="lr_scheduler = 'linear' is outside"):
        baseline_params(space, config_from_dict({**base, "lr_scheduler": "linear"}), "p", "s")


def test_the_baseline_is_queued_once(project):
    cfg = make_project(project, n_trials=1, epochs_choices=(2,))
    settings = load_settings(cfg)
    settings.study.baseline_config = str(proven_file(project))
    worker = Worker(settings)
    assert has_baseline(worker.study)
    assert not queue_baseline(worker.study, settings, worker.space, worker.base)
    assert len(worker.study.get_trials()) == 1
