"""Export a trial as a production training config: the exact values it trained with, with the
output paths of the base config instead of the trial folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.baseline import baseline_trial, versus
from search.constraints import describe, violations
from search.ratings import best_trial, judgements, ranked_value
from search.errors import StudyError
from search.trial_config import absolute_paths
from search.space import apply_params, kohya_schedule
from training.config import config_from_dict, write_config

OUTPUT_KEYS = ("output_dir", "output_name", "logging_dir")


def pick_trial(study: optuna.Study, number: Optional[int], human_weight: float = 0.0) -> FrozenTrial:
    """The named trial, or the best COMPLETE one (by score blended with human ratings, see search.ratings)."""
    if number is None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise StudyError(f"study '{study.study_name}' has no complete trial yet; wait for one or pass --trial N")
        return best_trial(study, human_weight)
    for trial in study.get_trials(deepcopy=False):
        if trial.number == number:
            if "accepted" not in trial.user_attrs:
                raise StudyError(f"trial {number} never trained ({trial.user_attrs.get('prune_reason', trial.state.name)}); "
                                 "pick a trained trial from lora-search status")
            return trial
    raise StudyError(f"study '{study.study_name}' has no trial {number}; see lora-search status")


def export_values(trial: FrozenTrial, base: dict[str, Any]) -> dict[str, Any]:
    """The trial's training values with the base config's output keys."""
    # a trial recorded before constant-with-warmup was mapped still exports as sd-scripts accepts it
    values = kohya_schedule(dict(trial.user_attrs.get("config") or absolute_paths(apply_params(base, trial.params))))
    for key in OUTPUT_KEYS:
        values.pop(key, None)
        if key in base:
            values[key] = base[key]
    return values


def export_trial(study: optuna.Study, base: dict[str, Any], out: Path, number: Optional[int] = None,
                 human_weight: float = 0.0) -> FrozenTrial:
    """Write the chosen trial as a complete config at ``out`` (atomically); it passes ``check``."""
    trial = pick_trial(study, number, human_weight)
    values = export_values(trial, base)
    fired = violations(config_from_dict(values, f"trial {trial.number}"))
    if fired:
        raise StudyError(f"trial {trial.number} violates {describe(fired[0])}; the base config changed since it ran")
    attrs = trial.user_attrs
    score = f"{trial.value:.4f}" if trial.value is not None else "none"
    header = "\n".join([
        f"# Exported by lora-search from study '{study.study_name}', trial {trial.number} ({trial.state.name}).",
        f"# Score {score}, best epoch {attrs.get('best_epoch', '?')} of {values.get('max_train_epochs', '?')};"
        f" checkpoint {attrs.get('best_checkpoint', 'none')}.",
        f"# Sampled params: {dict(sorted(trial.params.items()))}",
    ] + _human_lines(study, trial, human_weight) + _baseline_lines(study, trial, picked_best=number is None))
    write_config(out, values, header)
    return trial


def _human_lines(study: optuna.Study, trial: FrozenTrial, weight: float) -> list[str]:
    """What people said about the trial in the dashboard, and the blended value export ranked by."""
    judged = judgements(study).get(trial.number)
    if judged is None:
        return []
    lines = [f"# Human judgement: {judged.label()}" + (f' ("{judged.comment}")' if judged.comment else "") + "."]
    if weight > 0:
        value = ranked_value(trial, {trial.number: judged}, weight)
        lines.append(f"# Ranked by score blended with it (human_weight {weight:g}): {value:.4f}.")
    return lines


def _baseline_lines(study: optuna.Study, trial: FrozenTrial, picked_best: bool) -> list[str]:
    """How the exported trial compares with the study's baseline (the user's proven config)."""
    if trial.user_attrs.get("baseline"):
        verdict = "; no searched trial beat it." if picked_best else "."
        return [f"# This is the baseline trial: your proven config {trial.user_attrs.get('baseline_config')}{verdict}"]
    baseline = baseline_trial(study.get_trials(deepcopy=False))
    relative = versus(trial.value, baseline)
    if not relative:
        return []
    return [f"# {relative} (trial {baseline.number}, {baseline.user_attrs.get('baseline_config')}, "
            f"score {baseline.value:.4f})."]
