"""``lora-search start/stop/attach`` against a real tmux server on a socket of the test's own."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import libtmux
import optuna
import pytest

from search.cli import main
from search.settings import load_settings
from search.study import open_study
from pg_server import postgres_server  # noqa: F401  (fixture)
from search.tmux import (STORAGE_ENV, TmuxError, find_session, parse_gpus, restart_workers, set_session_storage,
                         study_cli_args, worker_windows)
from search.worker import trained_count
from study_fixtures import make_project

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def sock():
    """A tmux socket name used by this test only; its server is killed afterwards."""
    name = f"lora-search-test-{uuid.uuid4().hex[:8]}"
    yield name
    server = libtmux.Server(socket_name=name)
    if server.is_alive():
        server.kill()
    socket_file = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}" / name
    socket_file.unlink(missing_ok=True)  # tmux leaves the socket file behind


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TMUX", raising=False)
    monkeypatch.setenv("FAKE_TRAIN_LOG", str(tmp_path / "trained.log"))
    return tmp_path


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def pane_env(pane) -> dict[str, str]:
    raw = Path(f"/proc/{pane.pane_pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def command_lines() -> list[str]:
    """The command line of every process on the machine, as ``ps`` shows them to any user."""
    lines = []
    for proc in Path("/proc").iterdir():
        try:
            lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # not a process, or it just ended
            continue
    return lines


def with_password(url: str) -> tuple[str, str]:
    """``url`` with a password (the test server trusts any), and that password."""
    parts = urlsplit(url)
    if parts.password:
        return url, parts.password
    secret = f"pw{uuid.uuid4().hex[:12]}"
    return url.replace(f"//{parts.username}@", f"//{parts.username}:{secret}@", 1), secret


def test_start_runs_one_worker_per_gpu_until_the_budget(project, sock, capsys, monkeypatch):
    cfg = make_project(project, n_trials=4, storage=f"journal:{project / 'study.journal'}")
    assert main(["start", "--config", str(cfg), "--gpus", "0,1", "--socket-name", sock]) == 0
    out = capsys.readouterr().out
    assert "lora-search attach --study t" in out and "lora-search stop --study t" in out
    settings = load_settings(cfg)
    session = find_session(settings, sock)
    windows = {w.window_name: w for w in session.windows}
    assert set(windows) == {"monitor", "worker-gpu0", "worker-gpu1"}
    # read each worker's environment while it is still starting up
    for gpu in (0, 1):
        assert pane_env(windows[f"worker-gpu{gpu}"].panes[0])["CUDA_VISIBLE_DEVICES"] == str(gpu)

    # a second start on the running study refuses, naming attach and stop, and starts nothing
    assert main(["start", "--config", str(cfg), "--gpus", "0,1", "--socket-name", sock]) == 2
    err = capsys.readouterr().err.strip()
    assert "already runs" in err and "lora-search attach" in err and "lora-search stop" in err
    assert len(err.splitlines()) == 1 and len(find_session(settings, sock).windows) == 3

    study = open_study(settings, create=False)
    try:
        wait_for(lambda: all(not w.alive for w in worker_windows(settings, sock)), 120, "the workers to finish")
    except AssertionError:
        for gpu in (0, 1):  # show what the workers were doing
            print(f"--- worker-gpu{gpu}:\n" + "\n".join(windows[f"worker-gpu{gpu}"].panes[0].capture_pane()))
        raise
    assert trained_count(study) == 4
    assert {t.state for t in study.get_trials() if t.user_attrs.get("accepted")} == {optuna.trial.TrialState.COMPLETE}
    infos = worker_windows(settings, sock)
    assert [(w.name, w.gpu, w.alive) for w in infos] == [("worker-gpu0", 0, False), ("worker-gpu1", 1, False)]
    # tmux fills in the exit status when it reaps the worker, which can lag behind (or, seen with tmux
    # 3.3a when both exit at once, not happen); a known status must be a clean exit
    assert all(w.exit_status in (0, None) for w in infos)
    # both workers trained (two windows really shared the study), and the dead panes kept their output
    workers = {t.user_attrs["worker"] for t in study.get_trials() if t.user_attrs.get("accepted")}
    assert len(workers) == 2
    for gpu in (0, 1):
        assert "worker done" in "\n".join(session.windows.get(window_name=f"worker-gpu{gpu}").panes[0].capture_pane())
    monitor = session.windows.get(window_name="monitor").panes[0]
    wait_for(lambda: "refreshed every" in "\n".join(monitor.capture_pane()), 20, "the monitor's status")

    calls = []
    monkeypatch.setattr(os, "execvp", lambda prog, argv: calls.append(argv))
    assert main(["attach", "--study", "t", "--socket-name", sock]) == 0
    assert calls[0][1:] == ["-L", sock, "attach-session", "-t", "=t"]

    assert main(["stop", "--study", "t", "--socket-name", sock, "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    # tmux 3.3 sometimes never records a finished pane's exit status; then stop reports it as unknown.
    assert re.search(r"worker-gpu0: exited( with status 0)?\n", out) and "killed tmux session 't'" in out
    assert find_session(settings, sock) is None


def test_stop_interrupts_running_workers(project, sock, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_EPOCH_SECONDS", "1")  # trials take seconds, so stop catches them mid-run
    cfg = make_project(project, n_trials=8, epochs_choices=(4,))
    assert main(["start", "--config", str(cfg), "--gpus", "0,1", "--socket-name", sock]) == 0
    err = capsys.readouterr().err
    assert "SQLite" in err and "journal:" in err and "postgresql://" in err  # two workers on SQLite warns
    settings = load_settings(cfg)
    study = open_study(settings, create=False)
    wait_for(lambda: trained_count(study) >= 1, 30, "a trial to start training")

    assert main(["stop", "--config", str(cfg), "--socket-name", sock, "--timeout", "30"]) == 0
    out = capsys.readouterr().out
    assert "sent Ctrl-C to worker-gpu0, worker-gpu1" in out and "killed tmux session 't'" in out
    assert "still running" not in out
    assert find_session(settings, sock) is None
    assert trained_count(study) < 8
    # the interrupted workers recorded the trials they were training instead of leaving them RUNNING
    running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert not [t.number for t in running if t.user_attrs.get("accepted")]
    assert "worker-gpu0: exited" in out and "worker-gpu1: exited" in out


def test_missing_tmux_names_the_install_and_foreground(project, sock, capsys, monkeypatch):
    cfg = make_project(project, n_trials=1)
    monkeypatch.setenv("PATH", str(project / "empty-bin"))
    assert main(["start", "--config", str(cfg), "--socket-name", sock]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "tmux is not installed" in err and "apt-get install tmux" in err and "--foreground" in err
    assert worker_windows(load_settings(cfg), sock) == []  # status keeps working without tmux


def test_foreground_runs_one_worker_here(project, sock, capsys):
    cfg = make_project(project, n_trials=2)
    assert main(["start", "--config", str(cfg), "--foreground"]) == 0
    assert "has 2 of 2 trained" in capsys.readouterr().out
    assert trained_count(open_study(load_settings(cfg), create=False)) == 2
    assert main(["start", "--config", str(cfg), "--foreground", "--gpus", "0,1"]) == 2
    assert "--foreground runs one worker" in capsys.readouterr().err


def test_attach_and_stop_without_a_session(project, sock, capsys):
    cfg = make_project(project, n_trials=1)
    assert main(["attach", "--config", str(cfg), "--socket-name", sock]) == 2
    err = capsys.readouterr().err.strip()
    assert "no tmux session for study 't'" in err and "lora-search start" in err and len(err.splitlines()) == 1
    assert main(["stop", "--config", str(cfg), "--socket-name", sock]) == 0
    assert "nothing to stop" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["0,a", "0,0", "", "-1"])
def test_bad_gpu_lists_are_refused(text):
    with pytest.raises(TmuxError, match="--gpus"):
        parse_gpus(text)
    assert parse_gpus("1, 0") == [1, 0]


def test_restart_workers_brings_back_a_killed_worker_and_leaves_live_ones(project, sock, monkeypatch):
    monkeypatch.setenv("FAKE_EPOCH_SECONDS", "1")
    cfg = make_project(project, n_trials=8, epochs_choices=(4,))
    assert main(["start", "--config", str(cfg), "--socket-name", sock]) == 0
    settings = load_settings(cfg)
    study_args = study_cli_args(settings, cfg)
    pane = find_session(settings, sock).windows.get(window_name="worker-gpu0").panes[0]
    assert pane_env(pane)["LORA_SEARCH_SOCKET"] == sock  # status inside the session finds this socket
    wait_for(lambda: trained_count(open_study(settings, create=False)) >= 1, 30, "a trial to start training")
    os.kill(int(pane.pane_pid), signal.SIGKILL)
    wait_for(lambda: not worker_windows(settings, sock)[0].alive, 10, "the killed worker's pane to die")
    try:
        status = wait_for(lambda: worker_windows(settings, sock)[0].exit_status, 10, "tmux to reap the killed worker")
    except AssertionError:
        status = None  # tmux 3.3 sometimes never records a dead pane's exit status; restarting must not need it
    assert status in (None, 128 + signal.SIGKILL)  # shown like a shell's 137

    assert restart_workers(settings, study_args, socket_name=sock) == ["worker-gpu0"]
    assert restart_workers(settings, study_args, gpus=[0, 1], socket_name=sock) == ["worker-gpu1"]
    assert restart_workers(settings, study_args, gpus=[0, 1], socket_name=sock) == []  # healthy: nothing
    windows = {w.window_name: w.panes[0] for w in find_session(settings, sock).windows}
    assert [(w.name, w.alive) for w in worker_windows(settings, sock)] == [("worker-gpu0", True), ("worker-gpu1", True)]
    for gpu in (0, 1):
        assert pane_env(windows[f"worker-gpu{gpu}"])["CUDA_VISIBLE_DEVICES"] == str(gpu)
    assert main(["stop", "--config", str(cfg), "--socket-name", sock, "--timeout", "20"]) == 0


def test_killing_the_whole_tmux_server_then_resume_finishes_the_study(project, sock, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_EPOCH_SECONDS", "0.5")  # trials last seconds, so the kill lands mid-trial
    cfg = make_project(project, n_trials=4, storage=f"journal:{project / 'study.journal'}", epochs_choices=(4,))
    assert main(["start", "--config", str(cfg), "--gpus", "0,1", "--socket-name", sock]) == 0
    settings = load_settings(cfg)
    study = open_study(settings, create=False)
    wait_for(lambda: [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
                      if t.intermediate_values], 60, "a trial to score an epoch")
    libtmux.Server(socket_name=sock).kill()  # every worker dies with its pane, as in a reboot
    time.sleep(1)
    stuck = [t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]
    assert stuck
    capsys.readouterr()

    assert main(["resume", "--config", str(cfg), "--socket-name", sock, "--gpus", "0,1"]) == 0
    out = capsys.readouterr().out
    assert f"re-queued {len(stuck)} trial(s)" in out and "restarted: worker-gpu0, worker-gpu1" in out
    wait_for(lambda: all(not w.alive for w in worker_windows(settings, sock)), 180, "the restarted workers to finish")
    trials = study.get_trials()
    assert trained_count(study) == 4
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    for number in stuck:  # each killed trial was continued in its own folder by a retry that completed
        original = next(t for t in trials if t.number == number)
        [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == number]
        assert retry.state == optuna.trial.TrialState.COMPLETE
        assert retry.user_attrs["run_dir"] == original.user_attrs["run_dir"]


def test_storage_password_stays_out_of_the_process_list(project, sock, postgres_server):  # noqa: F811 (the fixture)
    url, secret = with_password(postgres_server())
    cfg = make_project(project, n_trials=2)  # the config's own storage: SQLite under runs/
    assert main(["start", "--config", str(cfg), "--storage", url, "--socket-name", sock]) == 0
    assert not [line for line in command_lines() if secret in line]  # tmux server, monitor, worker
    settings = load_settings(cfg, storage=url)
    study = open_study(settings, create=False)
    wait_for(lambda: trained_count(study) >= 1, 60, "a worker to start a trial")
    worker = find_session(settings, sock).windows.get(window_name="worker-gpu0").panes[0]
    leaked = [line for line in command_lines() if secret in line]
    assert not leaked, leaked
    assert pane_env(worker)[STORAGE_ENV] == url
    wait_for(lambda: all(not w.alive for w in worker_windows(settings, sock)), 120, "the worker to finish")
    assert trained_count(study) == 2  # the worker trained in the PostgreSQL study, not the config's SQLite
    assert not (project / "runs" / "t" / "study.db").exists()
    assert main(["stop", "--config", str(cfg), "--socket-name", sock, "--timeout", "5"]) == 0


def test_storage_urls_with_shell_and_tmux_characters_reach_the_session_intact(project, sock):
    server = libtmux.Server(socket_name=sock)
    server.new_session(session_name="s", window_command="sleep 60", attach=False)
    url = "postgresql://u:p'a\"s$HOME ~#;{x}\\@host:5432/db"
    set_session_storage(sock, "s", url)
    assert server.cmd("show-environment", "-t", "=s", STORAGE_ENV).stdout == [f"{STORAGE_ENV}={url}"]
    set_session_storage(sock, "s", "")  # no URL: the study config's storage, not the server's variable
    assert server.cmd("show-environment", "-t", "=s", STORAGE_ENV).stdout == [f"{STORAGE_ENV}="]
    with pytest.raises(TmuxError, match="line break"):
        set_session_storage(sock, "s", "postgresql://u:p@h/db\nx")
