"""Backend for users who already have kohya sd-scripts: runs their command line on the trial TOML.

The command (``[backend] command`` in study.toml) gets ``{config}`` and ``{run_dir}`` filled in; its
output goes to ``train.log`` in the trial folder. sd-scripts (``train_network.py``, ``sdxl_train_network.py``,
and for SD3/SD3.5 ``sd3_train_network.py``, whose trainer class extends train_network's and keeps its saving)
writes ``{output_name}-{epoch:06d}.safetensors`` every ``save_every_n_epochs`` and ``{output_name}.safetensors``
after the last epoch; each is scored as soon as it is complete (its size stopped changing, or the process
ended). The pre-flight check makes sure the command runs the script of the model's family.

A retry of a trial whose worker died continues sd-scripts where it stopped when the trial config saves
states (``save_state = true``): the command gets ``--resume <newest complete state folder>`` appended
(sd-scripts' ``{output_name}-{epoch:06d}-state``; complete once accelerate wrote its RNG file, its last),
so at most the epoch in progress is trained again; a run whose final state exists is not started again.
sd-scripts runs in its own process group, dies with the worker (Linux parent-death signal), and a retry
first ends whatever process group of the dead run is still alive (recorded in ``kohya.pid``).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from search.backends.base import EpochCallback, TrainerBackend
from search.errors import OutOfMemory, TrainingFailed
from training.config import TrainingConfig


class KohyaBackend(TrainerBackend):
    def __init__(self, command: list[str], poll_seconds: float = 2.0):
        if not command:
            raise TrainingFailed("[backend] command is empty; set the sd-scripts command line in study.toml")
        self.command = command
        self.poll_seconds = poll_seconds

    def train(self, config_path: Path, cfg: TrainingConfig, on_epoch: EpochCallback, resume: bool = False) -> None:
        run_dir = Path(cfg.output_dir)
        name = cfg.output_name or "last"
        argv = [part.format(config=config_path, run_dir=run_dir) for part in self.command]
        watcher = _CheckpointWatcher(run_dir, name, cfg.max_train_epochs)
        if resume:
            end_leftover_process(run_dir)
            if cfg.save_state and complete_state(run_dir / f"{name}-state"):
                self._follow_finished(watcher, on_epoch)  # it had finished: only its files are left to score
                return
            state = newest_state(run_dir, name) if cfg.save_state else None
            if state is not None:
                argv += ["--resume", str(state)]
        with open(run_dir / "train.log", "ab") as log:
            try:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=Path.cwd(),
                                        start_new_session=True, preexec_fn=_die_with_parent)
            except OSError as exc:
                raise TrainingFailed(f"cannot run {argv[0]!r} ({exc.strerror}); fix [backend] command") from None
            _write_pid(run_dir, proc.pid)
            try:
                self._follow(proc, watcher, on_epoch)
            except BaseException:
                _stop(proc)
                raise
        if proc.returncode != 0:
            log_path = run_dir / "train.log"
            message = f"kohya training exited with code {proc.returncode}; see {log_path}"
            if "out of memory" in _tail(log_path).lower():
                raise OutOfMemory(message + " (CUDA out of memory)")
            raise TrainingFailed(message)

    @staticmethod
    def _follow_finished(watcher: "_CheckpointWatcher", on_epoch: EpochCallback) -> None:
        for epoch, path in watcher.ready(process_ended=True):
            on_epoch(epoch, path)

    def _follow(self, proc: subprocess.Popen, watcher: "_CheckpointWatcher", on_epoch: EpochCallback):
        """sd-scripts' epochs are only visible through its checkpoints, so only saved epochs are reported."""
        while True:
            finished = proc.poll() is not None
            for epoch, path in watcher.ready(process_ended=finished):
                on_epoch(epoch, path)
            if finished:
                return
            time.sleep(self.poll_seconds)


def _tail(path: Path, size: int = 16384) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - size))
        return fh.read().decode("utf-8", "replace")


def _stop(proc: subprocess.Popen) -> None:
    """End sd-scripts and whatever it started (its process group): SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)  # children the leader left behind


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# prctl looked up once here: the child between fork and exec should do as little as possible.
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the worker dies, even by kill -9 (Linux only)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


PID_FILE = "kohya.pid"


def _write_pid(run_dir: Path, pid: int) -> None:
    (run_dir / PID_FILE).write_text(str(pid), encoding="utf-8")


def end_leftover_process(run_dir: Path) -> bool:
    """Kill the process group a dead worker's sd-scripts left running in ``run_dir``; says whether one was."""
    try:
        pgid = int((run_dir / PID_FILE).read_text(encoding="utf-8").strip())
        os.killpg(pgid, 0)
    except (OSError, ValueError):
        return False
    _signal_group(pgid, signal.SIGKILL)
    for _ in range(100):  # until the group is gone, so it cannot write into the retry's folder
        try:
            os.killpg(pgid, 0)
        except OSError:
            break
        time.sleep(0.05)
    return True


_STATE = re.compile(r"-(\d{6})-state$")


def complete_state(folder: Path) -> bool:
    """Whether an sd-scripts (accelerate) state folder was written to the end: accelerate saves the RNG
    states last."""
    return folder.is_dir() and any(folder.glob("random_states_*.pkl"))


def newest_state(run_dir: Path, output_name: str) -> Optional[Path]:
    """The complete ``{output_name}-{epoch:06d}-state`` folder of the highest epoch, if any."""
    found = []
    for folder in run_dir.glob(f"{glob.escape(output_name)}-*-state"):
        match = _STATE.search(folder.name)
        if match and folder.name == f"{output_name}-{match.group(1)}-state" and complete_state(folder):
            found.append((int(match.group(1)), folder))
    return max(found)[1] if found else None


class _CheckpointWatcher:
    """Finds new checkpoints in a run folder and hands each out once, when its size has settled."""

    def __init__(self, run_dir: Path, output_name: str, final_epoch: Optional[int]):
        self.run_dir = run_dir
        self.pattern = re.compile(re.escape(output_name) + r"-(\d{6})\.safetensors$")
        self.final = run_dir / f"{output_name}.safetensors"
        self.final_epoch = final_epoch
        self.sizes: dict[Path, int] = {}
        self.done: set[Path] = set()
        self.epochs: set[int] = set()

    def _candidates(self) -> list[tuple[int, Path]]:
        found = []
        for path in self.run_dir.glob("*.safetensors"):
            match = self.pattern.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        if self.final.exists() and self.final_epoch is not None:
            found.append((self.final_epoch, self.final))
        return sorted(found)

    def ready(self, process_ended: bool) -> list[tuple[int, Path]]:
        out = []
        for epoch, path in self._candidates():
            if path in self.done:
                continue
            size = path.stat().st_size
            if process_ended or self.sizes.get(path) == size:
                self.done.add(path)
                if epoch not in self.epochs:  # a numbered and a final file of one epoch: score once
                    self.epochs.add(epoch)
                    out.append((epoch, path))
            self.sizes[path] = size
        return out
