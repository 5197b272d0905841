"""Human ratings and comparisons in optuna-dashboard, posted the way the browser posts them, decide export."""

from __future__ import annotations

import json
import threading
import tomllib
import urllib.request

import optuna
import pytest
import tomli_w
from study_fixtures import SheetScorer, make_project

from search.cli import main
from search.dashboard import make_dashboard_server
from search.ratings import compare_name, judgements, ratings_name
from search.scoring import make_scorer
from search.settings import load_settings
from search.study import open_study
from search.worker import Worker

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Three trials trained and finished; then the user sets human_weight = 0.5 in study.toml."""
    monkeypatch.chdir(tmp_path)
    config = make_project(tmp_path, n_trials=3, epochs_choices=(2,))
    worker = Worker(load_settings(config), scorer=SheetScorer(make_scorer(load_settings(config))))
    worker.run()
    data = tomllib.loads(config.read_text())
    data["scorer"]["human_weight"] = 0.5
    config.write_text(tomli_w.dumps(data))
    return config


class Dashboard:
    """lora-search's dashboard server, spoken to as the browser speaks to it."""

    def __init__(self, settings):
        self.server = make_dashboard_server(settings, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.base = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict) -> int:
        request = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status

    def study(self, name: str) -> dict:
        summaries = self.get("/api/studies")["study_summaries"]
        study_id = next(s["study_id"] for s in summaries if s["study_name"] == name)
        return self.get(f"/api/studies/{study_id}") | {"study_id": study_id}


def stands_for(trial: dict) -> int:
    """The search trial a companion trial stands for (the dashboard hands user attrs over as strings)."""
    return int(next(a["value"] for a in trial["user_attrs"] if a["key"] == "trial"))


def exported_trial(config, tmp_path, capsys) -> int:
    out = tmp_path / "best.toml"
    assert main(["export", "--config", str(config), "--out", str(out)]) == 0
    capsys.readouterr()
    return int(out.read_text().split("trial ", 1)[1].split(" ", 1)[0])


def by_score(config) -> list[int]:
    study = open_study(load_settings(config), create=False)
    return [t.number for t in sorted(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)),
                                     key=lambda t: t.value, reverse=True)]


def test_rating_posted_in_the_dashboard_after_the_search_changes_the_export(project, tmp_path, capsys):
    settings = load_settings(project)
    clip_best, runner_up, _ = by_score(project)
    assert exported_trial(project, tmp_path, capsys) == clip_best  # nobody has rated anything yet
    with Dashboard(settings) as dashboard:
        rated = dashboard.study(ratings_name("t"))
        assert rated["form_widgets"]["output_type"] == "user_attr"  # the form the trial page shows
        assert [w["user_attr_key"] for w in rated["form_widgets"]["widgets"]] == ["rating", "comment"]
        forms = {stands_for(t): t for t in rated["trials"]}
        assert sorted(forms) == sorted(by_score(project))  # one form per finished trial
        assert all(t["state"] == "Running" for t in forms.values())  # so the form accepts input
        assert all(a["filename"].startswith("contact_sheet_e") for t in forms.values() for a in t["artifacts"])
        # what the form's Submit button sends
        for number, rating, comment in ((clip_best, 2, "wrong hair colour"), (runner_up, 9, "")):
            trial_id = forms[number]["trial_id"]
            assert dashboard.post(f"/api/trials/{trial_id}/user-attrs",
                                  {"user_attrs": {"rating": rating, "comment": comment}}) == 204

    assert exported_trial(project, tmp_path, capsys) == runner_up
    header = (tmp_path / "best.toml").read_text()
    assert "Human judgement: 9/10." in header and "human_weight 0.5" in header
    assert main(["status", "--config", str(project)]) == 0
    out = capsys.readouterr().out
    table_header = next(line for line in out.splitlines() if line.startswith("trial"))
    assert table_header.split()[10:13] == ["score", "rating", "ranked"]
    assert f"best: trial {runner_up} " in out and "rating 9/10" in out
    row = next(line for line in out.splitlines() if line.startswith(f"{clip_best} "))
    assert "2/10" in row.split()

    data = tomllib.loads(project.read_text())
    data["scorer"]["human_weight"] = 0.0
    project.write_text(tomli_w.dumps(data))
    assert exported_trial(project, tmp_path, capsys) == clip_best  # weight 0: the score alone decides


def test_choosing_the_worst_in_the_comparison_view_counts_as_lost_comparisons(project, tmp_path, capsys):
    settings = load_settings(project)
    clip_best, runner_up, third = by_score(project)
    with Dashboard(settings) as dashboard:
        compare = dashboard.study(compare_name("t"))
        assert compare["is_preferential"] and compare["feedback_component_type"]["output_type"] == "artifact"
        shown = {stands_for(t): t["number"] for t in compare["trials"]}
        assert sorted(shown) == sorted([clip_best, runner_up, third])  # compare_top (4) covers all three
        assert dashboard.post(f"/api/studies/{compare['study_id']}/preference",
                              {"mode": "ChooseWorst", "candidates": sorted(shown.values()),
                               "clicked": shown[clip_best]}) == 204
    study = open_study(settings, create=False)
    judged = judgements(study)
    assert (judged[clip_best].wins, judged[clip_best].losses) == (0, 2)
    assert (judged[runner_up].wins, judged[runner_up].losses) == (1, 0)
    assert exported_trial(project, tmp_path, capsys) != clip_best


def test_bad_human_weight_is_one_line(project, capsys):
    data = tomllib.loads(project.read_text())
    data["scorer"]["human_weight"] = 1.5
    project.write_text(tomli_w.dumps(data))
    assert main(["status", "--config", str(project)]) == 2
    err = capsys.readouterr().err.strip()
    assert "scorer.human_weight = 1.5" in err and len(err.splitlines()) == 1
