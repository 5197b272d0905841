"""The study at a glance: one row per trial, constraint rejection counts, the budget."""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial

from search.baseline import baseline_trial, versus
from search.ratings import HumanJudgement, best_trial, judgements, ranked_value
from search.worker import trained_count

COLUMNS = ("trial", "state", "dim", "alpha", "lr", "epochs", "optimizer", "accum", "warmup", "vram_gib", "score",
           "best_ep", "note")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def _progress(trial: FrozenTrial) -> str:
    """``epoch 3/20, last 0.62, ETA 2h10m`` for a running trial (from the epochs it finished so far)."""
    p = trial.user_attrs.get("progress")
    if not p:
        return "starting"
    parts = [f"epoch {p['epoch']}/{p['epochs'] or '?'}"]
    scores = trial.user_attrs.get("epoch_scores", {})
    if scores:
        parts.append(f"last {scores[max(scores, key=int)]:.4f}")
    done = p["epoch"] - p["first_epoch"] + 1
    if p["epochs"] and done > 0:
        per_epoch = (p["updated"] - p["started"]) / done
        parts.append("ETA " + _duration(per_epoch * (p["epochs"] - p["epoch"])))
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"


def _note(trial: FrozenTrial) -> str:
    text = _outcome(trial)
    if trial.user_attrs.get("baseline"):
        return f"baseline ({trial.user_attrs.get('baseline_config', 'your proven config')})" + (f"; {text}" if text else "")
    return text


def _outcome(trial: FrozenTrial) -> str:
    attrs = trial.user_attrs
    if trial.state.name == "RUNNING":
        return _progress(trial)
    reason = attrs.get("prune_reason")
    if reason == "constraint":
        return "rejected: constraint " + ", ".join(str(i) for i in attrs.get("constraints_violated", []))
    if reason == "vram":
        return "rejected: " + attrs.get("constraint_reasons", ["VRAM estimate over budget"])[0]
    if reason:
        return f"pruned: {reason}" if trial.state.name == "PRUNED" else reason
    if attrs.get("fail_reason"):
        return "failed: " + attrs["fail_reason"]
    return ""


def trial_row(trial: FrozenTrial, baseline: Optional[FrozenTrial] = None) -> list[str]:
    """One line of the table; with a baseline, its score relative to the baseline's after the score."""
    config = trial.user_attrs.get("config", {})
    p = {**config, **trial.params}
    alpha = config.get("network_alpha")
    cells = [_fmt(x) for x in (
        trial.number, trial.state.name, p.get("network_dim"), int(alpha) if alpha is not None else None,
        p.get("learning_rate"), p.get("max_train_epochs"), p.get("optimizer_type"),
        p.get("gradient_accumulation_steps"), p.get("lr_warmup_steps"), trial.user_attrs.get("vram_estimate_gib"),
        trial.value,
        trial.user_attrs.get("best_epoch"))] + [_note(trial)]
    if baseline is not None:
        relative = "baseline" if trial.number == baseline.number else versus(trial.value, baseline).split(" ")[0]
        cells.insert(COLUMNS.index("score") + 1, relative or "-")
    return cells


def format_table(rows: list[list[str]], header: tuple[str, ...]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def constraint_counts(trials: list[FrozenTrial]) -> Counter:
    counts: Counter = Counter()
    for trial in trials:
        counts.update(trial.user_attrs.get("constraints_violated", []))
    return counts


def add_human_columns(header: tuple[str, ...], rows: list[list[str]], trials: list[FrozenTrial],
                      judged: dict[int, HumanJudgement], weight: float) -> tuple[str, ...]:
    """After the score (and vs_baseline): ``rating`` (ratings and comparisons from the dashboard) and,
    with ``human_weight`` > 0, ``ranked`` (the blended value export picks by). Rows are changed in place."""
    if not judged and weight <= 0:
        return header
    at = header.index("vs_baseline" if "vs_baseline" in header else "score") + 1
    extra = ("rating", "ranked") if weight > 0 else ("rating",)
    for row, trial in zip(rows, trials):
        cells = [judged.get(trial.number, HumanJudgement()).label()]
        if weight > 0:
            cells.append(_fmt(ranked_value(trial, judged, weight)) if trial.state.name == "COMPLETE" else "-")
        row[at:at] = cells
    return header[:at] + extra + header[at:]


def status_text(study: optuna.Study, n_trials: int, human_weight: float = 0.0) -> str:
    trials = study.get_trials(deepcopy=False)
    out = [f"study '{study.study_name}': {trained_count(study)} of {n_trials} trials trained, "
           f"{len(trials)} sampled"]
    baseline = baseline_trial(trials)
    header = COLUMNS if baseline is None else (
        COLUMNS[:COLUMNS.index("score") + 1] + ("vs_baseline",) + COLUMNS[COLUMNS.index("score") + 1:])
    rows = [trial_row(t, baseline) for t in trials]
    judged = judgements(study)
    header = add_human_columns(header, rows, trials, judged, human_weight)
    out.append(format_table(rows, header))
    counts = constraint_counts(trials)
    rejected = sum(1 for t in trials if t.user_attrs.get("prune_reason") == "constraint")
    summary = ", ".join(f"#{cid}: {counts[cid]}" for cid in sorted(counts)) or "none"
    out.append(f"constraint rejections: {rejected} trial(s); by constraint {summary}")
    over_vram = sum(1 for t in trials if t.user_attrs.get("prune_reason") == "vram")
    if over_vram:
        out.append(f"VRAM rejections (estimate over gpu_memory_gb): {over_vram} trial(s)")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if baseline is not None:
        out.append(f"baseline: trial {baseline.number} ({baseline.user_attrs.get('baseline_config')}) "
                   f"{baseline.state.name.lower()}, score {_fmt(baseline.value)}")
    if complete:
        best = best_trial(study, human_weight)
        relative = versus(best.value, baseline) if baseline is not None and best.number != baseline.number else ""
        rated = judged.get(best.number)
        out.append(f"best: trial {best.number} score {_fmt(best.value)} at epoch {best.user_attrs.get('best_epoch')}"
                   + (f" ({relative})" if relative else "") + (f", rating {rated.label()}" if rated else "")
                   + (f", ranked {_fmt(ranked_value(best, judged, human_weight))} with human_weight {human_weight:g}"
                      if human_weight > 0 else ""))
    return "\n".join(out)


def windows_text(windows) -> str:
    """The tmux worker windows: alive or dead (with exit status) and the GPU each one uses."""
    if not windows:
        return "workers: no tmux session (lora-search start launches one; lora-search resume restarts it)"
    parts = []
    for w in windows:
        state = "alive" if w.alive else f"dead (exit {w.exit_status})"
        parts.append(f"{w.name} gpu {w.gpu if w.gpu is not None else '-'}: {state}")
    dead = sum(not w.alive for w in windows)
    hint = f"; {dead} dead: lora-search resume restarts them" if dead else ""
    return "workers: " + ", ".join(parts) + hint
