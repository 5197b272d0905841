"""Backend for users who already have kohya sd-scripts: runs their command line on the trial TOML.

The command (``[backend] command`` in study.toml) gets ``{config}`` and ``{run_dir}`` filled in; its
output goes to ``train.log`` in the trial folder. sd-scripts writes ``{output_name}-{epoch:06d}.safetensors``
every ``save_every_n_epochs`` and ``{output_name}.safetensors`` after the last epoch; each is scored as
soon as it is complete (its size stopped changing, or the process ended).
"""

from __future__ import annotations

import re
import subprocess
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
        argv = [part.format(config=config_path, run_dir=run_dir) for part in self.command]
        watcher = _CheckpointWatcher(run_dir, cfg.output_name or "last", cfg.max_train_epochs)
        with open(run_dir / "train.log", "ab") as log:
            try:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=Path.cwd())
            except OSError as exc:
                raise TrainingFailed(f"cannot run {argv[0]!r} ({exc.strerror}); fix [backend] command") from None
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
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
