"""Pruning compares trials at the same point of their own LR schedule, not at the same epoch number."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from search.pruners import ScheduleMedianPruner, best_by_fraction
from search.settings import load_settings, settings_from_dict
from search.study import make_pruner, make_sampler
from training.errors import ConfigError

EPOCHS = CategoricalDistribution([8, 24])


def finished(epochs: int, scores: dict[int, float]) -> optuna.trial.FrozenTrial:
    return create_trial(state=TrialState.COMPLETE, value=max(scores.values()), params={"max_train_epochs": epochs},
                        distributions={"max_train_epochs": EPOCHS}, intermediate_values=scores,
                        user_attrs={"config": {"max_train_epochs": epochs}})


def running(study: optuna.Study, epochs: int, scores: dict[int, float]) -> optuna.Trial:
    """A trial in training; its length comes from the config it trains with, as in the worker."""
    trial = study.ask()
    trial.set_user_attr("config", {"max_train_epochs": epochs})
    for step, value in scores.items():
        trial.report(value, step)
    return trial


def short_runs_study(pruner) -> optuna.Study:
    """Three finished 8-epoch runs that anneal fast: 0.6 at epoch 4 (half way), 0.7 at epoch 8."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for _ in range(3):
        study.add_trial(finished(8, {4: 0.6, 8: 0.7}))
    return study


def test_a_long_run_at_its_first_sixth_is_not_judged_against_short_runs_half_way():
    # a 24-epoch cosine run scores 0.5 at epoch 4: the raw-epoch median cuts it, the schedule one waits
    raw = short_runs_study(optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    assert running(raw, 24, {4: 0.5}).should_prune()
    fair = short_runs_study(ScheduleMedianPruner(n_startup_trials=3, min_fraction=0.0))
    assert not running(fair, 24, {4: 0.5}).should_prune()


def test_at_the_same_fraction_a_worse_run_is_pruned_and_a_better_one_goes_on():
    study = short_runs_study(ScheduleMedianPruner(n_startup_trials=3, min_fraction=0.5))
    assert running(study, 24, {12: 0.55}).should_prune()  # half way: 0.55 < the others' 0.6
    assert not running(study, 24, {12: 0.65}).should_prune()
    assert not running(study, 24, {6: 0.1}).should_prune()  # a quarter in: before min_fraction


def test_no_pruning_before_enough_finished_trials():
    study = optuna.create_study(direction="maximize", pruner=ScheduleMedianPruner(n_startup_trials=4))
    for _ in range(3):
        study.add_trial(finished(8, {4: 0.6, 8: 0.7}))
    assert not running(study, 8, {4: 0.1}).should_prune()


def test_best_by_fraction_reads_each_trials_own_length():
    trial = finished(24, {6: 0.5, 12: 0.6, 24: 0.7})
    assert best_by_fraction(trial, 0.25, maximize=True) == 0.5
    assert best_by_fraction(trial, 0.5, maximize=True) == 0.6
    assert best_by_fraction(trial, 0.2, maximize=True) is None


def test_sampler_and_pruner_types_from_study_toml():
    for kind, cls in (("tpe", optuna.samplers.TPESampler), ("random", optuna.samplers.RandomSampler),
                      ("gp", optuna.samplers.GPSampler)):
        assert isinstance(make_sampler(settings_from_dict({"sampler": {"type": kind}})), cls)
    settings = settings_from_dict({"pruner": {"type": "schedule_median", "min_fraction": 0.6}})
    assert make_pruner(settings).min_fraction == 0.6
    with pytest.raises(ConfigError, match=r"sampler.type = 'cmaes': use tpe, random, gp"):
        settings_from_dict({"sampler": {"type": "cmaes"}})
    with pytest.raises(ConfigError, match="pruner.min_fraction = 1.5"):
        settings_from_dict({"pruner": {"type": "schedule_median", "min_fraction": 1.5}})


def test_the_demo_study_keys_stay_valid():
    settings = settings_from_dict({"sampler": {"n_startup_trials": 5},
                                   "pruner": {"type": "median", "n_startup_trials": 2, "n_warmup_steps": 1}})
    assert isinstance(make_pruner(settings), optuna.pruners.MedianPruner)


def test_shipped_study_toml_loads():
    from study_fixtures import REPO

    settings = load_settings(REPO / "configs" / "study.toml")
    assert make_sampler(settings) is not None and make_pruner(settings) is not None


def test_gp_draws_at_random_after_a_rejection_instead_of_proposing_the_rejected_point_again():
    from optuna.distributions import FloatDistribution

    from search.study import GPAfterRejections

    space = {"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)}
    study = optuna.create_study(direction="maximize", sampler=GPAfterRejections(seed=0, n_startup_trials=2))
    for x in (0.1, 0.5, 0.9):
        study.add_trial(create_trial(value=x, params={"x": x, "y": 0.5}, distributions=space))
    trial = study.ask()
    assert study.sampler.sample_relative(study, study._storage.get_trial(trial._trial_id), space) != {}
    trial.set_user_attr("prune_reason", "constraint")  # as the worker records a rejection
    study.tell(trial, state=TrialState.PRUNED)
    after = study.ask()
    assert study.sampler.sample_relative(study, study._storage.get_trial(after._trial_id), space) == {}
