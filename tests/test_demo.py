"""``lora-search demo``: the README's main job, end to end on the tiny model (CPU)."""

from __future__ import annotations

from pathlib import Path

from optuna.trial import TrialState

from search.cli import main
from search.settings import load_settings
from search.study import open_study


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    root = tmp_path / "demo"
    assert main(["demo", "--out", str(root), "--n-trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "noise" in out and f"lora-search dashboard --config {root / 'configs' / 'study.toml'}" in out
    assert "2 of 2 trials trained" in out and "rejected: constraint 3" in out

    study = open_study(load_settings(root / "configs" / "study.toml"), create=False)
    trained = [t for t in study.get_trials() if t.user_attrs.get("accepted")]
    assert len(trained) == 2 and study.get_trials()[0].user_attrs["prune_reason"] == "constraint"
    best = study.best_trial
    run_dir = Path(best.user_attrs["run_dir"])
    assert Path(best.user_attrs["best_checkpoint"]).is_file()
    assert (run_dir / "scores.json").is_file()
    assert sorted(run_dir.glob("contact_sheet_e*.png")) and list((run_dir / "sample").glob("*.png"))
    assert set(best.user_attrs["components_e1"]) == {"identity", "pose_variety", "style", "prompt_adherence",
                                                     "technical"}
    artifacts = list((root / "demo" / "artifacts").rglob("*"))
    assert any(p.is_file() for p in artifacts)  # contact sheets uploaded for the dashboard
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trained)

    assert main(["check", str(root / "best.toml")]) == 0
