"""Random kill -9 against a running study, then the checks a user cares about.

```
python benchmarks/kill_storm.py [--backend kohya|builtin] [--storage sqlite|journal|postgresql://...]
                                [--kills 25] [--trials 4] [--epochs 4] [--seed 0] [--keep DIR]
```

Each round starts ``lora-search worker`` as a process, kills it with SIGKILL after a random delay
(uniform between ``--min-delay`` and ``--max-delay`` seconds: while it loads, trains, samples, scores
or reports), and brings the study back with ``lora-search resume --no-workers`` (every third round
with ``lora-search start --foreground`` killed the same way, since start recovers too). After the
last kill one worker runs to the end. Then it counts:

- trials left RUNNING or WAITING, and whether the budget was met;
- saved epochs of finished trials that were never scored, or scored but not reported, or whose
  ``epoch_scores`` attribute disagrees with the study's intermediate values;
- scored epochs whose sample images are incomplete (built-in backend; the kohya stand-in samples none);
- epochs trained more than once, and the most redone after one kill;
- temporary files of interrupted atomic writes left anywhere in the study folder.

``kohya`` uses the repository's stand-in sd-scripts (``tests/fake/train_network.py``, 0.5 s per epoch,
with sd-scripts' state folders and ``--resume``) and stand-in scorer; ``max_retry`` is raised so that
retries never run out (what is counted is what a kill loses, not the retry limit); ``builtin`` trains the toy
world's demo project (``search.demo.prepare``) with the real trainer and CLIP evaluator on the CPU.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the stand-in sd-scripts and the project builder of the study tests


def kohya_project(root: Path, storage: str, trials: int, epochs: int) -> Path:
    """A study on the stand-in sd-scripts (the tests' project builder: the repo's configs with the toy
    model and dataset as inputs), retried without limit."""
    import tomllib

    from study_fixtures import make_project

    path = make_project(root, n_trials=trials, storage=storage, name="storm", epochs_choices=(epochs,))
    study = tomllib.loads(path.read_text())
    study["study"].update(seed=3, max_retry=1000)
    path.write_text(tomli_w.dumps(study))
    return path


def builtin_project(root: Path, storage: str, trials: int, epochs: int) -> Path:
    """The demo's toy-world project with its first guess as every trial's recipe (epochs fixed)."""
    import tomllib

    from search.demo import prepare

    paths = prepare(root, n_trials=trials, say=lambda _: None)
    study = tomllib.loads(paths.study_config.read_text())
    study["study"].update(storage=storage, baseline_config="", heartbeat_interval=2, grace_period=6, max_retry=1000)
    study["pruner"] = {"type": "none"}
    paths.study_config.write_text(tomli_w.dumps(study))
    space = tomllib.loads((paths.configs / "search_space.toml").read_text())
    space["max_train_epochs"] = {"choices": [epochs]}
    (paths.configs / "search_space.toml").write_text(tomli_w.dumps(space))
    return paths.study_config


def storage_url(kind: str, root: Path) -> str:
    if kind == "sqlite":
        return ""
    if kind == "journal":
        return f"journal:{root}/runs/journal.log"
    return kind  # a postgresql:// URL of an empty database


def run_cli(args: list[str], env: dict, delay: float | None) -> bool:
    """Run ``python -m search ARGS``; with ``delay``, SIGKILL it then. Returns whether it was killed."""
    proc = subprocess.Popen([sys.executable, "-m", "search", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if delay is None:
        proc.wait()
        return False
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def storm(cfg: Path, env: dict, kills: int, rng: random.Random, min_delay: float, max_delay: float) -> int:
    """Kill workers ``kills`` times (fewer when the study finishes first); returns the kills done."""
    done = 0
    for round_no in range(kills):
        command = ["start", "--foreground"] if round_no % 3 == 2 else ["worker"]
        if run_cli([*command, "--config", str(cfg)], env, rng.uniform(min_delay, max_delay)):
            done += 1
        run_cli(["resume", "--config", str(cfg), "--no-workers"], env, None)
        if finished(cfg):
            break
    run_cli(["worker", "--config", str(cfg)], env, None)
    return done


def finished(cfg: Path) -> bool:
    from optuna.trial import TrialState

    from search.settings import load_settings
    from search.study import open_study
    from search.worker import trained_count

    from search.errors import StudyError

    settings = load_settings(cfg)
    try:
        study = open_study(settings, create=False)
    except StudyError:  # killed before it created the study
        return False
    pending = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    return not pending and trained_count(study) >= settings.study.n_trials


def epochs_trained(run_dir: Path, backend: str, epoch_log: Path) -> Counter:
    if backend == "kohya":
        lines = epoch_log.read_text().splitlines() if epoch_log.exists() else []
        return Counter(int(e) for d, e in (line.rsplit(" ", 1) for line in lines) if d == str(run_dir))
    log = (run_dir / "train.log").read_text(errors="replace") if (run_dir / "train.log").exists() else ""
    return Counter(int(epoch) for epoch in re.findall(r"epoch (\d+)/\d+: loss", log))


def audit(cfg: Path, backend: str, epoch_log: Path) -> dict:
    """What the kills cost, counted on the finished study."""
    from optuna.trial import TrialState

    from evaluation.generate import samples_complete
    from evaluation.samples import RunLayout, SavePoint
    from search.settings import load_settings
    from search.study import open_study
    from search.optuna_ext import retried_numbers
    from search.worker import trained_count
    from training.config import load_training_config

    settings = load_settings(cfg)
    study = open_study(settings, create=False)
    trials = study.get_trials()
    out = Counter()
    out["left running or waiting"] = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    out["budget met"] = int(trained_count(study) >= settings.study.n_trials)
    retried = retried_numbers(trials)
    out["trials failed for good"] = sum(t.state == TrialState.FAIL and t.user_attrs.get("accepted") is True
                                        and t.number not in retried for t in trials)
    redone_max = 0
    for trial in (t for t in trials if t.state == TrialState.COMPLETE):
        run_dir = Path(trial.user_attrs["run_dir"])
        layout = RunLayout(run_dir, load_training_config(run_dir / "config.toml"))
        saved = set(layout.checkpoints())
        scores = {int(e): s for e, s in trial.user_attrs.get("epoch_scores", {}).items()}
        out["complete trials"] += 1
        out["saved epochs"] += len(saved)
        out["saved epochs never scored"] += len(saved - set(scores))
        out["scored epochs never reported"] += len(set(scores) - set(trial.intermediate_values))
        out["scores disagreeing with the study"] += sum(
            trial.intermediate_values.get(e) != s for e, s in scores.items())
        if backend == "builtin":
            out["scored epochs with incomplete samples"] += sum(
                not samples_complete(layout, SavePoint(e)) for e in scores)
        trained = epochs_trained(run_dir, backend, epoch_log)
        out["epochs trained twice or more"] += sum(n > 1 for n in trained.values())
        redone_max = max([redone_max, *(n - 1 for n in trained.values())])
    out["most times one epoch was redone"] = redone_max
    out["temporary files left"] = sum(1 for _ in Path(settings.study_dir).rglob(".*.tmp"))
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("kohya", "builtin"), default="kohya")
    parser.add_argument("--storage", default="sqlite", help="sqlite, journal or a postgresql:// URL")
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-delay", type=float, default=None, help="seconds (default: 1.5 kohya, 6 builtin)")
    parser.add_argument("--max-delay", type=float, default=None, help="seconds (default: 5 kohya, 40 builtin)")
    parser.add_argument("--keep", type=Path, default=None, help="build the study here and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="kill-storm-"))
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    build = kohya_project if args.backend == "kohya" else builtin_project
    cfg = build(root, storage_url(args.storage, root), args.trials, args.epochs)
    epoch_log = root / "epochs.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_EPOCH_SECONDS": "0.5", "FAKE_EPOCH_LOG": str(epoch_log)}
    low = args.min_delay if args.min_delay is not None else (1.5 if args.backend == "kohya" else 6.0)
    high = args.max_delay if args.max_delay is not None else (5.0 if args.backend == "kohya" else 40.0)
    started = time.monotonic()
    kills = storm(cfg, env, args.kills, random.Random(args.seed), low, high)
    result = {"backend": args.backend, "storage": args.storage.split("@")[-1], "kills": kills,
              "minutes": round((time.monotonic() - started) / 60, 1), **audit(cfg, args.backend, epoch_log)}
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
