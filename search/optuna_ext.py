"""The few things lora-search needs from Optuna beyond its public API, each behind one named helper.

Workers use ask/tell and keep trials alive across processes (heartbeats, retries of a dead worker's
trial), which needs a trial's stored record and the storage's heartbeat settings; Optuna exposes those
only through ``Study._storage``, ``Trial._trial_id`` and ``optuna.storages._heartbeat``. Everything
else goes through the public API (``study.tell(number, ..., skip_if_finished=True)`` to fail a trial
another process may have finished).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

AnyTrial = Union[optuna.Trial, FrozenTrial]


def stored_trial(study: optuna.Study, trial: AnyTrial) -> FrozenTrial:
    """The trial as the storage holds it now (state, system attrs), read afresh."""
    return study._storage.get_trial(trial._trial_id)


def is_finished(study: optuna.Study, trial: AnyTrial) -> bool:
    return stored_trial(study, trial).state.is_finished()


def retried_number(study: optuna.Study, trial: AnyTrial) -> Optional[int]:
    """The number of the trial ``trial`` continues (a dead worker's run), or None for a fresh trial."""
    return RetryHeartbeatStaleTrialCallback.retried_trial_number(stored_trial(study, trial))


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials whose run was handed to a retry (the retry holds their budget slot)."""
    history: set[int] = set()
    for trial in trials:
        history.update(RetryHeartbeatStaleTrialCallback.retry_history(trial))
    return history


def set_attr(study: optuna.Study, trial: AnyTrial, key: str, value: Any) -> None:
    """Set a user attr on any unfinished trial, also one this process did not ask for."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def fail(study: optuna.Study, trial: AnyTrial) -> bool:
    """FAIL ``trial`` unless another process finished it first; says whether this call failed it."""
    if is_finished(study, trial):
        return False
    try:
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return stored_trial(study, trial).state == TrialState.FAIL


def heartbeat_interval(study: optuna.Study) -> Optional[int]:
    """Seconds between heartbeats when the storage records them (RDB storages), else None."""
    storage = study._storage
    return storage.get_heartbeat_interval() if is_heartbeat_enabled(storage) else None


def record_heartbeat(study: optuna.Study, trial: AnyTrial) -> None:
    study._storage.record_heartbeat(trial._trial_id)
