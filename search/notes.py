"""Trial notes for optuna-dashboard: what happened to a trial, in words, above its raw attributes."""

from __future__ import annotations

import optuna

from search.baseline import baseline_trial, versus


def rejection_note(reasons: list[str]) -> str:
    lines = ["**Rejected before training** (no budget used, no GPU time spent):", ""]
    return "\n".join(lines + [f"- {reason}" for reason in reasons])


def outcome_note(trial: optuna.Trial, outcome: str) -> str:
    """A Markdown summary of a trained trial: outcome, best epoch, checkpoint, per-epoch scores."""
    attrs = trial.user_attrs
    lines = [f"**{outcome}**"]
    if attrs.get("baseline"):
        lines.append(f"baseline: your proven config `{attrs.get('baseline_config')}`, the yardstick for every other trial")
    elif "best_score" in attrs:
        relative = versus(attrs["best_score"], baseline_trial(trial.study.get_trials(deepcopy=False)))
        if relative:
            lines.append(f"**{relative}**")
    reason = attrs.get("fail_reason") or attrs.get("prune_reason")
    if reason and outcome != "complete":
        lines.append(f"reason: {reason}")
    if "best_epoch" in attrs:
        lines += ["", f"best epoch **{attrs['best_epoch']}**, score {attrs['best_score']:.4f}",
                  "", f"checkpoint: `{attrs['best_checkpoint']}`"]
    scores = attrs.get("epoch_scores", {})
    if scores:
        lines += ["", "| epoch | score |", "| --- | --- |"]
        lines += [f"| {epoch} | {scores[epoch]:.4f} |" for epoch in sorted(scores, key=int)]
    lines += ["", f"run folder: `{attrs.get('run_dir', '-')}`"]
    return "\n".join(lines)


def save_trial_note(trial: optuna.Trial, body: str) -> None:
    from optuna_dashboard import save_note

    save_note(trial, body)
