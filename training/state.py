"""Resumable training state under ``{output_dir}/state/``.

A state saved at the end of an epoch is ``epoch-NNNNNN`` (the epoch); one saved mid-epoch, at a
``save_every_n_steps`` step, is ``step-NNNNNNNN`` (the optimizer step) and records how many batches of the
next epoch it already trained. States are ordered by optimizer step, an epoch's end after a mid-epoch
state of the same step.

A state is written into a hidden temporary folder and renamed into place only after every file and the
``COMPLETE`` marker (which records each file's size) are on disk, so a crash mid-write leaves either no
state folder or a hidden one that :func:`latest_state` never picks. The two newest states are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from training.atomic import _fsync_dir
from training.errors import LoraSearchError

MARKER = "COMPLETE"
_NAME = re.compile(r"^(epoch-\d{6}|step-\d{8})$")
KEEP = 2


@dataclass
class TrainingState:
    """Everything a resumed run needs to continue exactly where the saved one stopped."""

    epoch: int  # epochs completed
    global_step: int
    seed: int
    lora: dict[str, torch.Tensor]  # kohya-named float32 LoRA tensors
    optimizer: dict
    scheduler: dict
    scaler: Optional[dict]
    rng: dict
    config: dict  # the kohya keys the state was trained with
    total_steps: int = 0  # the run's planned optimizer steps (a changed dataset changes them)
    batch: int = 0  # batches of epoch ``epoch + 1`` already trained; 0 at an epoch's end


def capture_rng() -> dict[str, Any]:
    """The python, numpy and torch (CPU and CUDA) random states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the random states captured by :func:`capture_rng`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "state"


def state_name(state: TrainingState) -> str:
    """``epoch-NNNNNN`` for a state at an epoch's end, ``step-NNNNNNNN`` for one saved mid-epoch."""
    return f"step-{state.global_step:08d}" if state.batch else f"epoch-{state.epoch:06d}"


def save_state(output_dir: str | Path, state: TrainingState) -> Path:
    """Write ``state`` atomically as ``state/<state_name>`` and prune older states."""
    from safetensors.torch import save_file

    root = state_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / state_name(state)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        save_file({k: v.contiguous().cpu() for k, v in state.lora.items()}, str(tmp / "lora.safetensors"))
        torch.save({"optimizer": state.optimizer, "scheduler": state.scheduler, "scaler": state.scaler,
                    "rng": state.rng}, tmp / "training.pt")
        meta = {"epoch": state.epoch, "batch": state.batch, "global_step": state.global_step, "seed": state.seed,
                "total_steps": state.total_steps, "config": state.config}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _write_marker(tmp)
        if final.exists():  # the same state saved again (a repeated resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root)
    return final


def _write_marker(folder: Path) -> None:
    sizes = {}
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        sizes[path.name] = path.stat().st_size
    marker = folder / MARKER
    marker.write_text(json.dumps(sizes), encoding="utf-8")
    with open(marker, "rb") as fh:
        os.fsync(fh.fileno())


def is_complete(folder: Path) -> bool:
    """True when ``folder`` has its marker and every file has the size the marker recorded."""
    try:
        sizes = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        return bool(sizes) and all((folder / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, AttributeError):
        return False


def complete_states(output_dir: str | Path) -> list[Path]:
    """Complete state folders, oldest first (by optimizer step; an epoch's end after a mid-epoch state)."""
    root = state_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(_position(p), p) for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and is_complete(p)]
    return [p for position, p in sorted(f for f in found if f[0] is not None)]


def _position(folder: Path) -> Optional[tuple[int, int]]:
    """(optimizer step, epochs completed) of a state, or None when its meta.json is unreadable."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        return int(meta["global_step"]), int(meta["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prune(root: Path) -> None:
    for old in complete_states(root.parent)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for pattern in (".epoch-*.tmp", ".step-*.tmp"):  # from a crash mid-write
        for leftover in root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def latest_state(output_dir: str | Path) -> Optional[Path]:
    """The newest complete state folder, or None."""
    states = complete_states(output_dir)
    return states[-1] if states else None


def load_state(folder: Path) -> TrainingState:
    """Read a state folder written by :func:`save_state`."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        blob = torch.load(folder / "training.pt", map_location="cpu", weights_only=False)
        lora = load_file(str(folder / "lora.safetensors"))
    except Exception as exc:  # several exception types for a damaged file
        raise LoraSearchError(f"training state {folder} is unreadable ({exc}); delete it to resume from an older one") from None
    return TrainingState(epoch=meta["epoch"], global_step=meta["global_step"], seed=meta["seed"], lora=lora,
                         optimizer=blob["optimizer"], scheduler=blob["scheduler"], scaler=blob["scaler"],
                         rng=blob["rng"], config=meta["config"], total_steps=meta.get("total_steps", 0),
                         batch=meta.get("batch", 0))
