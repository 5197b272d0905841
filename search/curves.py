"""What a user sees of a trial's training: scores in its TensorBoard log, curve plots in optuna-dashboard.

Every epoch of a trained trial (after it is scored, before the pruner may stop it):

- the scores go into the trial's TensorBoard log (``logging_dir``, ``runs/<study>/trial_NNNN/logs``) as
  ``score/total`` and ``score/<component>`` at x = epoch, with the contact sheet as
  ``samples/contact_sheet``; through the built-in trainer's own writer when it runs in this process,
  so the trial stays one run in one event file at a time;
- two PNGs are drawn into the trial folder and shown in optuna-dashboard as two artifacts of the
  trial, uploaded at the first epoch and rewritten in place (same artifact, new picture) after each:
  ``curves.png`` (loss per step with its moving average, learning rate per parameter group, read
  back from the event files, so the kohya backend's curves show too) and ``scores.png`` (the
  total and each component per epoch, the best epoch marked).

Plots are drawn with matplotlib's Agg backend (no display needed) and written atomically.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from training import tb_log
from training.atomic import atomic_path

log = logging.getLogger(__name__)

CURVES_PNG, SCORES_PNG = "curves.png", "scores.png"


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under ``log_dir`` (all runs below it merged; a later run wins a step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, float]] = {}
    for run in sorted({p.parent for p in Path(log_dir).rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 1, "tensors": 1})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            merged.setdefault(tag, {}).update((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points.items()) for tag, points in merged.items()}


def _figure(height: float) -> Any:
    """An 800 px wide figure drawn without a display (a Figure, not pyplot: no global state)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(8, height), dpi=100, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_curves(scalars: dict[str, list[tuple[int, float]]], title: str, path: Path) -> Optional[Path]:
    """Loss (per step and its moving average) above the learning rates; None when nothing was logged."""
    if not scalars.get("loss/current"):
        return None
    fig = _figure(6)
    loss, lr = fig.subplots(2, 1, sharex=True)
    steps, values = zip(*scalars["loss/current"])
    loss.plot(steps, values, lw=0.8, alpha=0.45, color="tab:blue", label="loss/current")
    if scalars.get("loss/average"):
        loss.plot(*zip(*scalars["loss/average"]), lw=2, color="tab:blue", label="loss/average")
    loss.set_ylabel("loss")
    loss.set_title(title)
    loss.legend(loc="upper right")
    for tag in sorted(t for t in scalars if t.startswith("lr/")):
        lr.plot(*zip(*scalars[tag]), lw=1.5, label=tag)
    lr.set_ylabel("learning rate")
    lr.set_xlabel("optimizer step")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if lr.lines:
        lr.legend(loc="upper right")
    for ax in (loss, lr):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_scores(epoch_scores: dict[str, float], components: dict[int, dict[str, float]],
                best_epoch: Optional[int], title: str, path: Path) -> Optional[Path]:
    """Total score and each component per epoch; None before the first scored epoch."""
    if not epoch_scores:
        return None
    fig = _figure(3.6)
    ax = fig.subplots()
    epochs = sorted(int(e) for e in epoch_scores)
    names = sorted({name for parts in components.values() for name in parts})
    for name in names:
        shown = [e for e in epochs if name in components.get(e, {})]
        ax.plot(shown, [components[e][name] for e in shown], marker=".", lw=1.2, label=name)
    ax.plot(epochs, [epoch_scores[str(e)] for e in epochs], marker="o", lw=2.5, color="black", label="total")
    if best_epoch is not None and str(best_epoch) in epoch_scores:
        ax.axvline(best_epoch, color="tab:red", ls="--", lw=1, label=f"best epoch {best_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("score")
    ax.set_xticks(epochs)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    return _save(fig, path)


def trial_components(user_attrs: dict[str, Any]) -> dict[int, dict[str, float]]:
    """The per-epoch components the worker records as ``components_e<epoch>`` user attrs."""
    return {int(key[len("components_e"):]): value for key, value in user_attrs.items()
            if key.startswith("components_e") and key[len("components_e"):].isdigit()}


class TrialCurves:
    """One trained trial's score events and dashboard plots (see the module docstring)."""

    def __init__(self, trial: Any, run_dir: Path, cfg: Any, artifact_dir: Path):
        self.trial, self.run_dir, self.artifact_dir = trial, Path(run_dir), Path(artifact_dir)
        self.log_dir = Path(cfg.logging_dir).resolve() if tb_log.uses_tensorboard(cfg) else None
        self._writer: Any = None  # ours, when no trainer in this process writes to log_dir
        self._uploaded: dict[str, str] = {}  # file name -> its artifact id

    def scored(self, epoch: int, total: float, components: dict[str, float], images: list[Path]) -> None:
        """Write one epoch's scores (and its contact sheet) into the trial's TensorBoard log."""
        if self.log_dir is None:
            return
        writer = tb_log.shared_writer(self.log_dir) or self._own_writer()
        writer.add_scalar("score/total", total, epoch)
        for name, value in components.items():
            writer.add_scalar(f"score/{name}", value, epoch)
        for image in images[:1]:
            writer.add_image("samples/contact_sheet", _pixels(image), epoch, dataformats="HWC")
        writer.flush()

    def refresh(self) -> None:
        """Redraw both plots and show them in the dashboard in place of the previous ones."""
        attrs = self.trial.user_attrs
        title = f"trial {self.trial.number}"
        drawn = [plot_scores(attrs.get("epoch_scores", {}), trial_components(attrs), attrs.get("best_epoch"),
                             f"{title}: score per epoch", self.run_dir / SCORES_PNG)]
        if self.log_dir is not None and self.log_dir.is_dir():
            drawn.append(plot_curves(read_scalars(self.log_dir), f"{title}: loss and learning rate",
                                     self.run_dir / CURVES_PNG))
        for path in drawn:
            if path is not None:
                self._replace_artifact(path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _own_writer(self) -> Any:
        if self._writer is None:
            self._writer = tb_log.summary_writer(self.log_dir)
        return self._writer

    def _replace_artifact(self, path: Path) -> None:
        from optuna.artifacts import FileSystemArtifactStore, upload_artifact

        known = self._uploaded.get(path.name)
        if known is None:
            store = FileSystemArtifactStore(str(self.artifact_dir))
            self._uploaded[path.name] = upload_artifact(artifact_store=store, file_path=str(path),
                                                        study_or_trial=self.trial)
            return
        # A FileSystemArtifactStore keeps an artifact as <base>/<artifact id>; the dashboard reads
        # either the old picture or the new one, never half of one.
        with atomic_path(self.artifact_dir / known) as tmp:
            shutil.copyfile(path, tmp)


def _pixels(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
