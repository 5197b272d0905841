"""Human judgement in optuna-dashboard: ratings and pairwise comparisons that can decide the winner.

optuna-dashboard lets a person fill in a form only on a RUNNING trial, and optuna refuses any change
to a finished one, so the judging happens in two companion studies in the same storage, each of whose
trials stands for one trained trial of the search (its user attr ``trial`` is that trial's number):

- ``<study>-ratings``: one trial per COMPLETE trial of the search, showing the contact sheet of its
  best epoch with a form (optuna-dashboard's user-attribute form widgets): a 1-10 slider
  (``rating``) and an optional ``comment``. It stays RUNNING, so a rating can be changed at any time.
- ``<study>-compare``: a preferential study (optuna-dashboard's pairwise view) holding the contact
  sheets of the ``[scorer] compare_top`` best trials by score; clicking the worst of those shown
  records that each other one beat it. A trial that drops out of the top is hidden (skipped).

A trial's human score (0..1) is the mean of what it has: ``(rating - 1) / 9`` and its share of
comparisons won. ``[scorer] human_weight`` w blends it into the value that ``status`` ranks and
``export`` picks: ``(1 - w) * score + w * human``; a trial nobody judged keeps its score. The blend
assumes the scorer's score is on 0..1, as the CLIP scorer's is. It is computed when asked, so a
rating given after a trial finished changes the next export without re-running anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

RATING_KEY, COMMENT_KEY, SHEET_KEY = "rating", "comment", "contact_sheet"
RATING_MIN, RATING_MAX = 1, 10


def ratings_name(study_name: str) -> str:
    return f"{study_name}-ratings"


def compare_name(study_name: str) -> str:
    return f"{study_name}-compare"


@dataclass
class HumanJudgement:
    """What people said about one trial of the search."""

    rating: Optional[float] = None  # 1..10
    comment: str = ""
    wins: int = 0
    losses: int = 0

    @property
    def score(self) -> Optional[float]:
        """0..1: the mean of the normalised rating and the share of comparisons won; None if unjudged."""
        parts = []
        if self.rating is not None:
            parts.append((self.rating - RATING_MIN) / (RATING_MAX - RATING_MIN))
        if self.wins + self.losses:
            parts.append(self.wins / (self.wins + self.losses))
        return sum(parts) / len(parts) if parts else None

    def label(self) -> str:
        """``8/10``, ``won 2 of 3``, both, or ``-``."""
        parts = []
        if self.rating is not None:
            parts.append(f"{self.rating:g}/{RATING_MAX}")
        if self.wins + self.losses:
            parts.append(f"won {self.wins} of {self.wins + self.losses}")
        return ", ".join(parts) or "-"


def _load(storage: Any, name: str) -> Optional[optuna.Study]:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # never created: nobody had anything to judge yet
        return None


def judgements(study: optuna.Study) -> dict[int, HumanJudgement]:
    """Ratings and comparison results per trial number of ``study`` (the search)."""
    found: dict[int, HumanJudgement] = {}
    rated = _load(study._storage, ratings_name(study.study_name))
    for trial in rated.get_trials(deepcopy=False) if rated is not None else []:
        value = trial.user_attrs.get(RATING_KEY)
        if "trial" in trial.user_attrs and isinstance(value, (int, float)) and not isinstance(value, bool):
            entry = found.setdefault(trial.user_attrs["trial"], HumanJudgement())
            entry.rating = min(max(float(value), RATING_MIN), RATING_MAX)
            entry.comment = str(trial.user_attrs.get(COMMENT_KEY) or "")
    compared = _load(study._storage, compare_name(study.study_name))
    if compared is not None:
        _count_comparisons(compared, found)
    return found


def _count_comparisons(compared: optuna.Study, found: dict[int, HumanJudgement]) -> None:
    from optuna_dashboard.preferential._system_attrs import get_preferences

    source = {t.number: t.user_attrs.get("trial") for t in compared.get_trials(deepcopy=False)}
    for better, worse in get_preferences(compared._storage.get_study_system_attrs(compared._study_id)):
        if source.get(better) is not None and source.get(worse) is not None:
            found.setdefault(source[better], HumanJudgement()).wins += 1
            found.setdefault(source[worse], HumanJudgement()).losses += 1


def ranked_value(trial: FrozenTrial, judged: dict[int, HumanJudgement], weight: float) -> Optional[float]:
    """The value ``status`` ranks and ``export`` picks by: the score blended with the human score."""
    if trial.value is None:
        return None
    human = judged.get(trial.number, HumanJudgement()).score
    if weight <= 0 or human is None:
        return trial.value
    return (1 - weight) * trial.value + weight * human


def best_trial(study: optuna.Study, weight: float) -> FrozenTrial:
    """The COMPLETE trial with the highest ranked value (the study's own best when weight is 0)."""
    if weight <= 0:
        return study.best_trial
    judged = judgements(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (ranked_value(t, judged, weight), -t.number))


# --- offering trials for judgement ---------------------------------------------------------------------

def _rating_widgets() -> list:
    from optuna_dashboard import SliderWidget, TextInputWidget

    return [
        SliderWidget(min=RATING_MIN, max=RATING_MAX, step=1, user_attr_key=RATING_KEY,
                     description="How good is this trial's best epoch? (1 = unusable, 10 = ship it)"),
        TextInputWidget(description="Comment (optional)", user_attr_key=COMMENT_KEY, optional=True),
    ]


def _open_ratings(study: optuna.Study) -> optuna.Study:
    from optuna_dashboard import register_user_attr_form_widgets

    rated = optuna.create_study(study_name=ratings_name(study.study_name), storage=study._storage,
                                load_if_exists=True, direction="maximize")
    register_user_attr_form_widgets(rated, _rating_widgets())
    return rated


def _open_compare(study: optuna.Study, top: int) -> Any:
    from optuna_dashboard import register_preference_feedback_component
    from optuna_dashboard.preferential import create_study

    compared = create_study(n_generate=max(top, 2), storage=study._storage, study_name=compare_name(study.study_name),
                            load_if_exists=True, sampler=optuna.samplers.RandomSampler())
    register_preference_feedback_component(compared, "artifact", SHEET_KEY)
    return compared


def _stands_for(study: optuna.Study) -> dict[int, FrozenTrial]:
    """Trial number of the search -> the companion trial standing for it."""
    return {t.user_attrs["trial"]: t for t in study.get_trials(deepcopy=False) if "trial" in t.user_attrs}


def _best_sheet(trial: FrozenTrial) -> Optional[Path]:
    sheets = [Path(p) for p in trial.user_attrs.get("best_images", [])]
    return next((p for p in sheets if p.is_file()), None)


def _offer(target: optuna.Study, trial: FrozenTrial, store: Any) -> optuna.Trial:
    """A RUNNING companion trial standing for ``trial``, with its best epoch's contact sheet."""
    from optuna.artifacts import upload_artifact
    from optuna_dashboard import save_note

    offered = target.ask()
    attrs = trial.user_attrs
    offered.set_user_attr("trial", trial.number)
    offered.set_user_attr("best_epoch", attrs.get("best_epoch"))
    offered.set_user_attr("score", trial.value)
    sheet = _best_sheet(trial)
    if sheet is not None:
        offered.set_user_attr(SHEET_KEY, upload_artifact(artifact_store=store, file_path=str(sheet),
                                                          study_or_trial=offered))
    params = ", ".join(f"{k} {v}" for k, v in sorted(trial.params.items()))
    save_note(offered, f"**Trial {trial.number}** of study `{trial_study_name(target)}`, best epoch "
                       f"{attrs.get('best_epoch')}, score {trial.value:.4f}\n\n{params}\n\n"
                       f"checkpoint: `{attrs.get('best_checkpoint', '-')}`")
    return offered


def trial_study_name(companion: optuna.Study) -> str:
    return companion.study_name.rsplit("-", 1)[0]


def offer_for_judgement(study: optuna.Study, artifact_dir: Path, compare_top: int = 4,
                        only: Optional[int] = None) -> dict[int, int]:
    """Give each COMPLETE trial (or just trial ``only``) its rating form, and the top ones to compare.

    Idempotent; returns {trial number: rating trial number} for the trials now offered.
    """
    from optuna.artifacts import FileSystemArtifactStore

    store = FileSystemArtifactStore(str(artifact_dir))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rated = _open_ratings(study)
    present = _stands_for(rated)
    offered = {}
    for trial in complete:
        if trial.number not in present and (only is None or trial.number == only):
            offered[trial.number] = _offer(rated, trial, store).number
    _refresh_compare(study, complete, compare_top, store)
    return offered


def _refresh_compare(study: optuna.Study, complete: list[FrozenTrial], top: int, store: Any) -> None:
    """The top ``top`` trials by score are in the pairwise view; those that fell out are hidden."""
    from optuna_dashboard.preferential._system_attrs import get_skipped_trial_ids, report_skip

    if top < 2 or len(complete) < 2:
        return
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    leaders = {t.number for t in sorted(complete, key=lambda t: t.value, reverse=maximize)[:top]}
    compared = _open_compare(study, top)
    inner = compared._study
    present = _stands_for(inner)
    skipped = set(get_skipped_trial_ids(inner._storage.get_study_system_attrs(inner._study_id)))
    for trial in complete:
        if trial.number in leaders and trial.number not in present and _best_sheet(trial) is not None:
            _offer(inner, trial, store)
    for number, companion in present.items():
        if number not in leaders and companion._trial_id not in skipped:
            report_skip(inner._study_id, companion._trial_id, inner._storage)


def rating_link(study: optuna.Study, rating_number: int) -> str:
    """Markdown for the main trial's note: where its rating form is."""
    rated = optuna.load_study(study_name=ratings_name(study.study_name), storage=study._storage)
    return (f"[rate this trial (1-10)](/dashboard/studies/{rated._study_id}/trials?numbers={rating_number}) in study "
            f"`{rated.study_name}`")
