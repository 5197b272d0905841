"""A worker: pulls trials from the shared study until the budget is met.

Each trial is sampled, checked against the seven safety constraints (a rejection is PRUNED at once and
costs no budget), written as ``runs/<study>/trial_NNNN/config.toml``, trained by the backend, scored
at every saved epoch (``trial.report(score, epoch)``; the pruner may stop it), and finished with its
best epoch's score.

The budget ``n_trials`` counts trials that trained: accepted trials in any state (complete, failed,
pruned on quality, running). Several workers share it: a trial that passed the constraints takes a
budget slot only if fewer than ``n_trials`` accepted trials have a lower trial number, so two workers
racing for the last slot never both train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from search.backends import make_backend
from search.backends.base import TrainerBackend
from search.baseline import queue_baseline
from search.constraints import describe, violations
from search.curves import TrialCurves
from search.errors import ConfigError, LoraSearchError, StudyError, TrainingFailed, is_out_of_memory
from search.notes import outcome_note, rejection_note, save_trial_note
from search.optuna_ext import (heartbeat_interval, is_finished, record_heartbeat, retried_number, retried_numbers,
                               stored_trial)
from search.recovery import hand_over
from search.scoring import CheckpointScorer, EpochScore, make_scorer
from search.settings import StudySettings
from search.space import SearchSpace, load_search_space
from search.study import open_study
from search.trial_config import load_base_values, trial_values, write_trial_config
from training.atomic import remove_temporary_files
from training.config import TrainingConfig, config_from_dict
from training.vram import estimate_vram

log = logging.getLogger(__name__)

# How long a worker waits for lower-numbered trials that were just sampled to be accepted or rejected
# before it counts budget slots (constraint checks take milliseconds; a worker that died meanwhile
# must not block the others for ever).
DECISION_WAIT_S = 15.0
# A space whose every draw is rejected would otherwise sample for ever.
MAX_REJECTIONS_IN_A_ROW = 500


class StopRequested(KeyboardInterrupt):
    """Raised at an epoch boundary after ``request_stop``: the trial is queued to continue, the worker exits."""


@contextlib.contextmanager
def trial_log(path: Path):
    """Copy lora-search's log lines (worker, trainer, evaluator) into the trial's own log file."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("search", "training", "evaluation")]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def free_gpu_memory() -> None:
    """Give cached CUDA blocks back after an out-of-memory error so the next trial starts clean."""
    import sys

    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def counts_toward_budget(trial: FrozenTrial) -> bool:
    return trial.user_attrs.get("accepted") is True and trial.user_attrs.get("prune_reason") != "budget"


def slot_holders(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials holding a budget slot; a crashed trial hands its slot to the retry continuing it."""
    retried = retried_numbers(trials)
    return [t for t in trials if counts_toward_budget(t) and t.number not in retried]


def trained_count(study: optuna.Study) -> int:
    """Trials that used (or are using) a budget slot."""
    return len(slot_holders(study.get_trials(deepcopy=False)))


def _undecided_below(study: optuna.Study, number: int) -> bool:
    return any(
        t.number < number and t.state == TrialState.RUNNING and "accepted" not in t.user_attrs
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    )


def claim_budget_slot(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """Mark ``trial`` accepted and say whether it is within the budget (see the module docstring)."""
    trial.set_user_attr("accepted", True)
    deadline = time.monotonic() + DECISION_WAIT_S
    while _undecided_below(study, trial.number) and time.monotonic() < deadline:
        time.sleep(0.2)
    ahead = [t for t in slot_holders(study.get_trials(deepcopy=False)) if t.number < trial.number]
    return len(ahead) < n_trials


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial):
    """Record the trial's heartbeat in the background while it trains (RDB storages only).

    Optuna beats only inside ``Study.optimize``; workers use ask/tell, so they beat themselves.
    """
    interval = heartbeat_interval(study)
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            record_heartbeat(study, trial)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclass
class TrialRun:
    """What one accepted trial tracks while it trains."""

    trial: optuna.Trial
    run_dir: Path
    config_path: Path
    maximize: bool
    epochs: Optional[int] = None
    best_epoch: Optional[int] = None
    best_score: Optional[float] = None
    best_checkpoint: Optional[Path] = None
    started: float = dataclasses.field(default_factory=time.time)
    first_epoch: Optional[int] = None
    curves: Optional[TrialCurves] = None  # score events and dashboard plots, refreshed each epoch

    def progress(self, epoch: int) -> None:
        """Record the finished epoch and when, for ``status`` (epoch k of n, ETA)."""
        if self.first_epoch is None:
            self.first_epoch = epoch
        self.trial.set_user_attr("progress", {"epoch": epoch, "epochs": self.epochs, "first_epoch": self.first_epoch,
                                              "started": self.started, "updated": time.time()})

    def __post_init__(self) -> None:
        # A retry inherits its crashed run's attrs: its epochs scored so far still count. A kill may
        # fall between recording an epoch's score and its best_* attrs, so the best is taken again from
        # every scored epoch.
        attrs = self.trial.user_attrs
        if "best_score" in attrs:
            self.best_epoch, self.best_score = attrs["best_epoch"], attrs["best_score"]
            self.best_checkpoint = Path(attrs["best_checkpoint"])
        for epoch, score in sorted((int(e), s) for e, s in attrs.get("epoch_scores", {}).items()):
            if self._better(score):
                self.best_epoch, self.best_score = epoch, score
                self.best_checkpoint = None  # found again by the retry's catch-up (it re-records it)

    def _better(self, score: float) -> bool:
        return self.best_score is None or (score > self.best_score if self.maximize else score < self.best_score)

    def record(self, result: EpochScore, checkpoint: Path) -> None:
        better = self._better(result.total) or result.epoch == self.best_epoch
        scores = dict(self.trial.user_attrs.get("epoch_scores", {}))
        scores[str(result.epoch)] = result.total
        self.trial.set_user_attr("epoch_scores", scores)
        if result.components:
            self.trial.set_user_attr(f"components_e{result.epoch}", result.components)
        if better:
            self.best_epoch, self.best_score, self.best_checkpoint = result.epoch, result.total, checkpoint
            self.trial.set_user_attr("best_epoch", result.epoch)
            self.trial.set_user_attr("best_score", result.total)
            self.trial.set_user_attr("best_checkpoint", str(checkpoint))
            self.trial.set_user_attr("best_images", [str(Path(p).resolve()) for p in result.images])


class Worker:
    """Runs trials of one study; ``run()`` returns when the budget is met."""

    def __init__(self, settings: StudySettings, backend: Optional[TrainerBackend] = None,
                 scorer: Optional[CheckpointScorer] = None, study: Optional[optuna.Study] = None):
        """``study`` replaces the one ``settings`` names (benchmarks run many in memory)."""
        self.settings = settings
        self.space: SearchSpace = load_search_space(settings.study.search_space)
        self.base: dict[str, Any] = load_base_values(settings.study.base_config, settings.study.preset)
        if settings.scorer.type == "clip" and not self.base.get("sample_prompts"):
            raise ConfigError(f"{settings.study.base_config} has no sample_prompts; the CLIP scorer scores sample "
                              "images: set sample_prompts (e.g. prompts/character.txt) and sample_every_n_epochs")
        # each worker process gets its own sampler seed, so parallel workers do not draw the same trials
        self.study = study or open_study(settings, seed_offset=os.getpid())
        if settings.study.baseline_config:
            queue_baseline(self.study, settings, self.space, self.base)
        self.backend = backend or make_backend(settings)
        self.scorer = scorer or make_scorer(settings)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.stop_requested = False
        # Called before each trial; raising stops the worker (lora-search worker checks that the model
        # and dataset are still there, see search.preflight.check_inputs).
        self.before_trial: Callable[[], None] = lambda: None

    def request_stop(self) -> None:
        """Finish the current epoch (its checkpoint and state are saved), queue the trial to continue, exit."""
        self.stop_requested = True

    @property
    def study_dir(self) -> Path:
        return self.settings.study_dir

    def run(self, max_trials: Optional[int] = None) -> int:
        """Work until the study's budget is met (or ``max_trials`` trials trained here); returns that count."""
        trained = rejected_in_a_row = 0
        while max_trials is None or trained < max_trials:
            if self.stop_requested:
                log.info("stopped on request; lora-search start or resume continues the study")
                break
            retries = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if not retries and trained_count(self.study) >= self.settings.study.n_trials:
                log.info("budget of %d trained trials reached", self.settings.study.n_trials)
                break
            self.before_trial()
            try:
                outcome = self.run_next()
            except StopRequested:
                log.info("stopped on request after an epoch; the trial is queued to continue")
                break
            if outcome == "budget":
                break
            trained += outcome != "rejected"
            rejected_in_a_row = rejected_in_a_row + 1 if outcome == "rejected" else 0
            if rejected_in_a_row >= MAX_REJECTIONS_IN_A_ROW:
                raise StudyError(f"{rejected_in_a_row} sampled trials in a row were rejected before training; "
                                 "widen configs/search_space.toml or raise gpu_memory_gb (see lora-search status)")
        return trained

    def run_next(self) -> str:
        """Sample one trial and carry it through; returns what happened to it."""
        fail_stale_trials(self.study)  # a dead worker's trial is failed and queued for retry
        trial = self.study.ask()
        try:
            return self._carry(trial)
        except BaseException:  # Ctrl-C / SIGTERM (stop): never leave the trial RUNNING
            if not is_finished(self.study, trial):
                self._interrupted(trial)
            raise

    def _carry(self, trial: optuna.Trial) -> str:
        trial.set_user_attr("worker", self.name)
        retry_of = retried_number(self.study, trial)
        if retry_of is not None and "config" in trial.user_attrs:
            return self._continue(trial, retry_of)
        params = self.space.suggest(trial)
        run_dir = self.study_dir / f"trial_{trial.number:04d}"
        base = self.base
        if trial.user_attrs.get("baseline"):  # the proven config's own keys hold for its trial
            base = {**self.base, **trial.user_attrs.get("baseline_values", {})}
        values = trial_values(base, params, run_dir)
        cfg = config_from_dict(values, f"trial {trial.number}")
        fired = violations(cfg)
        if fired:
            return self._reject(trial, "constraint", [describe(c) for c in fired], [c.id for c in fired])
        vram = estimate_vram(cfg).total_gib
        trial.set_user_attr("vram_estimate_gib", round(vram, 2))
        if vram > self.settings.study.gpu_memory_gb:
            reason = f"VRAM estimate {vram:.1f} GiB exceeds gpu_memory_gb = {self.settings.study.gpu_memory_gb:g}"
            return self._reject(trial, "vram", [reason])
        if not claim_budget_slot(self.study, trial, self.settings.study.n_trials):
            trial.set_user_attr("accepted", False)  # lost the race for the last slot: it never trains
            trial.set_user_attr("prune_reason", "budget")
            self.study.tell(trial, state=TrialState.FAIL)
            return "budget"
        return self._train(trial, values, run_dir)

    def _reject(self, trial: optuna.Trial, kind: str, reasons: list[str], ids: Optional[list[int]] = None) -> str:
        """PRUNED before training, without intermediate values (TPE ranks it worst); no budget used."""
        if ids is not None:
            trial.set_user_attr("constraints_violated", ids)
        trial.set_user_attr("constraint_reasons", reasons)
        trial.set_user_attr("prune_reason", kind)
        self.study.tell(trial, state=TrialState.PRUNED)
        save_trial_note(trial, rejection_note(reasons))
        log.info("trial %d rejected before training: %s", trial.number, "; ".join(reasons))
        return "rejected"

    def _continue(self, trial: optuna.Trial, retry_of: int) -> str:
        """A retry of a trial whose worker died: same params, same folder, resumed from its state."""
        run_dir = Path(trial.user_attrs["run_dir"])
        log.info("trial %d continues trial %d in %s", trial.number, retry_of, run_dir)
        inherited = trial.user_attrs.get("fail_reason")
        if inherited:  # the dead run's reason goes to the history; this run has not failed
            history = list(trial.user_attrs.get("earlier_failures", []))
            trial.set_user_attr("earlier_failures", history + [f"trial {retry_of}: {inherited}"])
            trial.set_user_attr("fail_reason", None)
        return self._train(trial, trial.user_attrs["config"], run_dir, resume=True)

    def _catch_up(self, run: TrialRun, cfg: TrainingConfig) -> None:
        """A retry first settles what its dead run left half done, in epoch order: every checkpoint it
        saved but did not score is scored (the final file too: the resumed trainer may find nothing left
        to train), and a score recorded but not reported (killed in between) is reported now."""
        from evaluation.samples import RunLayout

        remove_temporary_files(run.run_dir)
        reported = stored_trial(self.study, run.trial).intermediate_values
        scores = run.trial.user_attrs.get("epoch_scores", {})
        for epoch, path in RunLayout(run.run_dir, cfg).checkpoints().items():
            if str(epoch) not in scores:
                log.info("trial %d scores epoch %d, saved before the interruption", run.trial.number, epoch)
                self._score(run, epoch, path)
            elif epoch not in reported:
                log.info("trial %d reports epoch %d, scored before the interruption", run.trial.number, epoch)
                run.record(EpochScore(epoch, scores[str(epoch)]), path)
                self._report(run, epoch, scores[str(epoch)])

    def _train(self, trial: optuna.Trial, values: dict[str, Any], run_dir: Path, resume: bool = False) -> str:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / "config.toml"
        header = f"# lora-search study '{self.settings.study.name}', trial {trial.number}: base config + sampled params"
        cfg = write_trial_config(config_path, values, header)
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        trial.set_user_attr("config", values)
        run = TrialRun(trial, run_dir, config_path, self.settings.study.direction == "maximize",
                       epochs=cfg.max_train_epochs, curves=TrialCurves(trial, run_dir, cfg, self.artifact_dir()))
        try:
            with heartbeat(self.study, trial), trial_log(run_dir / "train.log"):
                log.info("trial %d training in %s with %s", trial.number, run_dir, trial.params)
                if resume:
                    self._catch_up(run, cfg)
                self.backend.train(config_path, cfg, lambda epoch, ckpt: self._on_epoch(run, epoch, ckpt),
                                   resume=resume)
        except optuna.TrialPruned:
            trial.set_user_attr("prune_reason", "quality")
            self.study.tell(trial, state=TrialState.PRUNED)
            save_trial_note(trial, outcome_note(trial, "pruned on quality"))
            log.info("trial %d pruned on quality after epoch %s", trial.number, run.best_epoch)
            return "pruned"
        except Exception as exc:  # a crash inside training must not take the whole search down
            if is_out_of_memory(exc):
                return self._out_of_memory(trial, exc)
            if not isinstance(exc, LoraSearchError):
                log.exception("trial %d crashed", trial.number)
            return self._fail(trial, str(exc) if isinstance(exc, LoraSearchError) else f"{type(exc).__name__}: {exc}")
        finally:
            run.curves.close()
        if run.best_score is None:
            return self._fail(trial, "training ended without a scored checkpoint; set save_every_n_epochs")
        self.study.tell(trial, run.best_score)
        save_trial_note(trial, outcome_note(trial, "complete") + self._offer_for_judgement(trial))
        log.info("trial %d complete: best epoch %d scored %.4f", trial.number, run.best_epoch, run.best_score)
        return "complete"

    def _offer_for_judgement(self, trial: optuna.Trial) -> str:
        """The finished trial's rating form (and the comparison view's update); a line for its note."""
        from search.ratings import offer_for_judgement, rating_link

        try:
            offered = offer_for_judgement(self.study, self.artifact_dir(), self.settings.scorer.compare_top,
                                          only=trial.number)
        except Exception as exc:  # the search goes on; lora-search dashboard offers it again when it starts
            log.warning("trial %d: rating form not created (%s: %s)", trial.number, type(exc).__name__, exc)
            return ""
        return f"\n\n{rating_link(self.study, offered[trial.number])}" if trial.number in offered else ""

    def _interrupted(self, trial: optuna.Trial) -> None:
        """The worker was stopped mid-trial: FAIL it and, if it was training, queue a retry that the
        next worker (after ``lora-search resume`` or ``start``) continues from its last saved state."""
        if trial.user_attrs.get("accepted") is not True:
            self._fail(trial, "interrupted before training")
            return
        hand_over(self.study, trial, "interrupted; queued to continue", self.settings.study.max_retry)
        save_trial_note(trial, outcome_note(trial, "failed"))
        log.warning("trial %d interrupted; queued to continue", trial.number)

    def _out_of_memory(self, trial: optuna.Trial, exc: BaseException) -> str:
        """PRUNED, not FAIL: TPE ignores failed trials and would keep proposing what does not fit."""
        free_gpu_memory()
        trial.set_user_attr("prune_reason", "oom")
        trial.set_user_attr("fail_reason", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self.study.tell(trial, state=TrialState.PRUNED)
        save_trial_note(trial, outcome_note(trial, "out of GPU memory (pruned, so TPE avoids it)"))
        log.warning("trial %d ran out of GPU memory; recorded as pruned (oom)", trial.number)
        return "pruned"

    def _fail(self, trial: optuna.Trial, reason: str) -> str:
        trial.set_user_attr("fail_reason", reason)
        self.study.tell(trial, state=TrialState.FAIL)
        save_trial_note(trial, outcome_note(trial, "failed"))
        log.warning("trial %d failed: %s", trial.number, reason)
        return "failed"

    def _on_epoch(self, run: TrialRun, epoch: int, checkpoint: Optional[Path]) -> None:
        run.progress(epoch)
        if checkpoint is not None and str(epoch) not in run.trial.user_attrs.get("epoch_scores", {}):
            self._score(run, epoch, checkpoint)  # (an epoch scored before a crash keeps its inherited score)
        else:
            self._refresh_curves(run)
        if self.stop_requested:
            raise StopRequested(f"stop requested after epoch {epoch}")

    def _score(self, run: TrialRun, epoch: int, checkpoint: Path) -> None:
        result = self.scorer.score(run.run_dir, run.config_path, epoch, checkpoint)
        if not math.isfinite(result.total):
            raise TrainingFailed(f"epoch {epoch} scored {result.total}; the checkpoint is unusable")
        run.record(result, checkpoint)
        self._upload(run, result)
        self._refresh_curves(run, result)
        self._report(run, epoch, result.total)

    def _report(self, run: TrialRun, epoch: int, score: float) -> None:
        run.trial.report(score, epoch)
        log.info("trial %d epoch %d score %.4f", run.trial.number, epoch, score)
        if run.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch} score {score:.4f}")

    def _refresh_curves(self, run: TrialRun, result: Optional[EpochScore] = None) -> None:
        """Log the epoch's scores and redraw the trial's plots; a failure there is logged, never a reason to
        fail the trial."""
        if run.curves is None:
            return
        try:
            if result is not None:
                run.curves.scored(result.epoch, result.total, result.components, result.images)
            run.curves.refresh()
        except Exception as exc:  # matplotlib, a torn event file: the training matters more than its picture
            log.warning("trial %d: curves not drawn (%s: %s)", run.trial.number, type(exc).__name__, exc)

    def _upload(self, run: TrialRun, result: EpochScore) -> None:
        if not result.images:
            return
        from optuna.artifacts import FileSystemArtifactStore, upload_artifact

        store = FileSystemArtifactStore(str(self.artifact_dir()))
        for image in result.images:
            upload_artifact(artifact_store=store, file_path=str(image), study_or_trial=run.trial)

    def artifact_dir(self) -> Path:
        path = self.study_dir / "artifacts"
        path.mkdir(parents=True, exist_ok=True)
        return path
