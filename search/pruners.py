"""A quality pruner that compares trials at the same point of their own LR schedule.

Each trial reports its score at every scored epoch (``trial.report(score, epoch)``), but trials differ
in ``max_train_epochs``, which also sets the length of their LR schedule: epoch 6 is the middle of a
12-epoch cosine run and the first quarter of a 24-epoch one. Optuna's own pruners compare trials at
equal step numbers, so they favour short, fast-starting schedules and cut long runs that have not
annealed yet (``benchmarks/search_efficiency.py`` measured it lowering the final pick).

:class:`ScheduleMedianPruner` compares at equal *fractions* of the schedule instead: a trial that has
done fraction f of its epochs is pruned when its best score so far is below the median of what the
finished trials had reached by fraction f of theirs.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState


def schedule_length(trial: FrozenTrial) -> Optional[int]:
    """The trial's ``max_train_epochs``: from the config it trains with, else its params."""
    config = trial.user_attrs.get("config") or {}
    epochs = config.get("max_train_epochs", trial.params.get("max_train_epochs"))
    return int(epochs) if epochs else None


def best_by_fraction(trial: FrozenTrial, fraction: float, maximize: bool) -> Optional[float]:
    """The trial's best reported score among epochs within ``fraction`` of its schedule (None: none yet)."""
    epochs = schedule_length(trial)
    if not epochs:
        return None
    values = [v for step, v in trial.intermediate_values.items()
              if step / epochs <= fraction + 1e-9 and math.isfinite(v)]
    if not values:
        return None
    return max(values) if maximize else min(values)


class ScheduleMedianPruner(BasePruner):
    """Median pruning on the fraction of each trial's own schedule that is done.

    ``n_startup_trials``: finished trials needed (with a score by the same fraction) before any pruning;
    ``min_fraction``: no trial is pruned before it has done this fraction of its epochs.
    """

    def __init__(self, n_startup_trials: int = 3, min_fraction: float = 0.5):
        if not 0 <= min_fraction <= 1:
            raise ValueError(f"min_fraction {min_fraction} must be within [0, 1]")
        self.n_startup_trials = n_startup_trials
        self.min_fraction = min_fraction

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        epochs = schedule_length(trial)
        if step is None or not epochs or step / epochs < self.min_fraction or step >= epochs:
            return False
        fraction = step / epochs
        maximize = study.direction == StudyDirection.MAXIMIZE
        mine = best_by_fraction(trial, fraction, maximize)
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        theirs = [v for v in (best_by_fraction(t, fraction, maximize) for t in finished) if v is not None]
        if mine is None or len(theirs) < max(self.n_startup_trials, 1):
            return False
        median = statistics.median(theirs)
        return mine < median if maximize else mine > median
