"""Crash recovery: fail the RUNNING trials whose worker is gone and queue retries that continue them.

Two ways to tell a worker is gone:

- its heartbeat is older than ``grace_period`` (RDB storages; works across machines): Optuna's
  ``fail_stale_trials`` fails it and the storage's retry callback queues the copy;
- it ran on this machine and its process no longer exists (any storage, journal included, and right
  away, e.g. after a reboot or ``kill -9``).

The retry is a WAITING trial with the same params and user attrs (run folder, config, epochs scored
so far); a worker picks it up before sampling anything new and resumes the run from its last saved
training state (see :meth:`search.worker.Worker.run_next`).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from search.optuna_ext import AnyTrial, fail, retried_numbers, set_attr, stored_trial
from search.study import retry_callback


def worker_alive(worker: Optional[str]) -> Optional[bool]:
    """Whether the worker ``host:pid`` still runs; None when that cannot be told from here."""
    if not worker or ":" not in worker:
        return None
    host, _, pid_text = worker.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    cmdline = Path(f"/proc/{pid_text}/cmdline")
    try:
        # a reused pid after a reboot belongs to some other program: only a lora-search worker counts
        return b"worker" in cmdline.read_bytes()
    except OSError:
        return False


def hand_over(study: optuna.Study, trial: AnyTrial, reason: str, max_retry: int) -> None:
    """Queue the retry that continues ``trial``, then FAIL it, in an order a kill cannot break: killed
    before the retry exists, the trial is still RUNNING and recovered again; killed after, the next
    recovery finds the retry and only fails the trial."""
    set_attr(study, trial, "fail_reason", reason)
    if trial.number not in retried_numbers(study.get_trials(deepcopy=False)):
        retry_callback(max_retry)(study, stored_trial(study, trial))
    fail(study, trial)


def recover_dead_trials(study: optuna.Study, max_retry: int) -> list[int]:
    """Fail trials of dead workers and queue their retries; returns the failed trial numbers."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_alive(trial.user_attrs.get("worker")) is not False:
            continue
        hand_over(study, trial, DIED, max_retry)
    for trial in orphans(study.get_trials(deepcopy=False)):
        retry_callback(max_retry)(study, trial)
    after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    return sorted(before - after)


DIED = "worker died; retried"


def orphans(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Accepted trials that Optuna failed for a stale heartbeat without a retry (the process doing it
    was killed in between): a worker's own failure always records a ``fail_reason``."""
    retried = retried_numbers(trials)
    return [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("accepted") is True
            and not t.user_attrs.get("fail_reason") and t.number not in retried]
