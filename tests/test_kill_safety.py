"""kill -9 at the worst moments: every saved epoch ends up scored once, reported once, and no epoch is
trained twice more than once per kill.

Each test runs a real worker process and kills it with SIGKILL at an exact point (inside the worker's
own methods, so the moment is not left to timing), then brings the study back as a user would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from optuna.trial import TrialState

from pg_server import postgres_server  # noqa: F401  (fixture)
from search.cli import main
from search.settings import load_settings
from search.status import status_text
from search.study import open_study
from search.worker import Worker
from study_fixtures import REPO, make_project

# Runs ``lora-search worker --config CFG`` with Worker.<KILL_AT> made to SIGKILL its own process when
# it is called for epoch KILL_EPOCH of the first trial that gets there.
DRIVER = """
import os, signal, sys
import search.worker as w

where, target = os.environ["KILL_AT"], int(os.environ["KILL_EPOCH"])
original = getattr(w.Worker, where)

def killer(self, run, epoch, *args):
    if epoch == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, run, epoch, *args)

setattr(w.Worker, where, killer)
from search.cli import main
sys.exit(main(["worker", "--config", sys.argv[1]]))
"""


def kill_worker_at(cfg: Path, where: str, epoch: int, epoch_seconds: float = 0.01) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KILL_AT": where, "KILL_EPOCH": str(epoch),
           "FAKE_EPOCH_SECONDS": str(epoch_seconds)}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(cfg)], env=env, capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]


def the_killed_trial(settings):
    [trial] = open_study(settings, create=False).get_trials(states=(TrialState.RUNNING,))
    return trial


def assert_every_epoch_scored_and_reported_once(settings, epochs: int) -> list:
    study = open_study(settings, create=False)
    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete
    for trial in complete:
        assert sorted(trial.intermediate_values) == list(range(1, epochs + 1)), trial.number
        scores = {int(e): s for e, s in trial.user_attrs["epoch_scores"].items()}
        assert scores == trial.intermediate_values  # the attributes agree with what the study saw
        best = max(scores, key=scores.get)
        assert (trial.user_attrs["best_epoch"], trial.user_attrs["best_score"], trial.value) == (
            best, scores[best], scores[best])
    return trials


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_EPOCH_LOG", str(tmp_path / "epochs.log"))
    return tmp_path


def epochs_trained(root: Path, run_dir: str) -> Counter:
    lines = (root / "epochs.log").read_text().splitlines()
    return Counter(int(e) for d, e in (line.rsplit(" ", 1) for line in lines) if d == run_dir)


def test_kill_between_score_and_report_reports_the_epoch_on_retry(project):
    cfg = make_project(project, n_trials=2, epochs_choices=(3,))
    settings = load_settings(cfg)
    kill_worker_at(cfg, "_report", 2)  # epoch 2 is in the trial's attributes, not yet in the study
    killed = the_killed_trial(settings)
    assert sorted(killed.intermediate_values) == [1] and "2" in killed.user_attrs["epoch_scores"]
    assert main(["resume", "--config", str(cfg), "--no-workers"]) == 0
    Worker(settings).run()
    assert_every_epoch_scored_and_reported_once(settings, 3)


def test_kill_while_the_last_epoch_is_scored_scores_the_final_file_on_retry(project):
    cfg = make_project(project, n_trials=1, epochs_choices=(3,))
    settings = load_settings(cfg)
    kill_worker_at(cfg, "_score", 3)  # sd-scripts has finished; the final file was never scored
    run_dir = Path(the_killed_trial(settings).user_attrs["run_dir"])
    assert (run_dir / "lora.safetensors").is_file()
    assert main(["resume", "--config", str(cfg), "--no-workers"]) == 0
    Worker(settings).run()
    [retry] = [t for t in assert_every_epoch_scored_and_reported_once(settings, 3) if t.state == TrialState.COMPLETE]
    assert epochs_trained(project, str(run_dir)) == Counter({1: 1, 2: 1, 3: 1})  # a finished run is not re-run
    assert retry.user_attrs["fail_reason"] is None  # it ended well: status must not call it failed
    assert retry.user_attrs["earlier_failures"] == [f"trial {retry.number - 1}: worker died; retried"]
    [row] = [line for line in status_text(open_study(settings, create=False), 1).splitlines()
             if line.split()[:1] == [str(retry.number)]]
    assert "COMPLETE" in row and "failed" not in row


@pytest.mark.parametrize("storage", ["", "journal", "postgresql"])
def test_kohya_run_continues_from_its_last_state_and_dies_with_its_worker(project, storage, request):
    if storage == "postgresql":
        storage = request.getfixturevalue("postgres_server")()
    elif storage == "journal":
        storage = f"journal:{project}/runs/journal.log"
    cfg = make_project(project, n_trials=1, epochs_choices=(5,), storage=storage)
    settings = load_settings(cfg)
    kill_worker_at(cfg, "_score", 2, epoch_seconds=0.4)  # sd-scripts is training epoch 3 meanwhile
    run_dir = Path(the_killed_trial(settings).user_attrs["run_dir"])
    pid = int((run_dir / "kohya.pid").read_text())
    assert wait_until_gone(pid), "sd-scripts kept running after its worker was killed"
    leftover = run_dir / ".lora-000002.safetensors.k1ll3d.tmp"  # an atomic write the kill interrupted
    leftover.write_bytes(b"half")

    assert main(["start", "--config", str(cfg), "--foreground"]) == 0  # start recovers it as resume does
    assert_every_epoch_scored_and_reported_once(settings, 5)
    trained = epochs_trained(project, str(run_dir))
    assert sorted(trained) == [1, 2, 3, 4, 5]
    assert sum(trained.values()) - 5 <= 1  # at most the epoch in progress was trained again
    assert not leftover.exists()


def wait_until_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie child of nobody's is reaped by init; its /proc status says Z until then
        status = Path(f"/proc/{pid}/status")
        if status.exists() and "State:\tZ" in status.read_text():
            return True
        time.sleep(0.05)
    return False


def test_samples_a_kill_cut_short_are_drawn_again_before_scoring(tmp_path, monkeypatch):
    from evaluation.generate import samples_complete
    from evaluation.samples import RunLayout, SavePoint
    from search.scoring import ClipScorer
    from training.config import config_from_dict

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of zkx\nzkx on grass\n")
    cfg = config_from_dict({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "output_dir": str(tmp_path),
                            "output_name": "last", "sample_prompts": str(prompts)})
    layout = RunLayout(tmp_path, cfg)
    layout.sample_dir.mkdir()
    layout.sample_path(1, 0).write_bytes(b"png")  # the kill came before prompt 1's image
    assert not samples_complete(layout, SavePoint(1))
    drawn = []
    monkeypatch.setattr("evaluation.sample_checkpoint", lambda layout, point, ckpt: drawn.append(point.epoch))

    class Scored(Exception):
        pass

    scorer = ClipScorer.__new__(ClipScorer)  # no CLIP needed to see what is sampled before scoring
    scorer.evaluator = type("E", (), {"score_epoch": staticmethod(lambda *a: (_ for _ in ()).throw(Scored()))})()
    (tmp_path / "config.toml").write_text(f'[model]\npretrained_model_name_or_path = "m"\n'
                                          f'[dataset]\ntrain_data_dir = "d"\n'
                                          f'[sampling]\nsample_prompts = "{prompts}"\n')
    with pytest.raises(Scored):
        scorer.score(tmp_path, tmp_path / "config.toml", 1, tmp_path / "last-000001.safetensors")
    assert drawn == [1]
    layout.sample_path(1, 1).write_bytes(b"png")
    assert samples_complete(layout, SavePoint(1))


def test_worker_stops_when_the_model_vanishes_mid_study(project, monkeypatch, capsys):
    """An error that would repeat for every trial stops the worker with one line, not trial after trial."""
    import search.worker as worker_module
    from study_fixtures import TOY_MODEL

    cfg = make_project(project, n_trials=3, epochs_choices=(2,))
    link = project / "model"
    link.symlink_to(TOY_MODEL)
    base = project / "configs" / "base.toml"
    base.write_text(base.read_text().replace(str(TOY_MODEL), str(link)))
    original = worker_module.Worker._train

    def train_then_lose_the_model(self, *args, **kwargs):
        outcome = original(self, *args, **kwargs)
        link.unlink()  # e.g. an external disk unplugged after the first trial
        return outcome

    monkeypatch.setattr(worker_module.Worker, "_train", train_then_lose_the_model)
    assert main(["worker", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is gone" in err[0] and str(link) in err[0]
    trials = open_study(load_settings(cfg), create=False).get_trials()
    assert len([t for t in trials if t.user_attrs.get("accepted")]) == 1  # no trial failed on the missing model
    assert not [t for t in trials if t.state == TrialState.RUNNING]
