"""The pre-flight check: each kind of bad input stops ``lora-search start`` with one line, exit 2, before
anything is created; read-only commands never create a study or a file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from search.cli import main
from search.demo import prepare


def replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


def base(p):
    return p / "configs" / "base.toml"


def corrupt_image(p):
    image = next((p / "data" / "train").rglob("*.png"))
    image.write_bytes(image.read_bytes()[:200])  # a download cut short: the header reads, the pixels do not


def empty_dataset(p):
    for image in (p / "data" / "train").rglob("*.png"):
        image.unlink()


def flat_dataset(p):
    folder = next((p / "data" / "train").iterdir())
    folder.rename(folder.parent / "zkx star")  # no N_ repeat prefix


def model_folder_without_index(p):
    folder = p / "model"
    folder.mkdir()
    replace(base(p), '"' + _model(p) + '"', f'"{folder}"')


def _model(p) -> str:
    return next(line.split('"')[1] for line in base(p).read_text().splitlines()
                if line.startswith("pretrained_model_name_or_path"))


def random_file_model(p):
    junk = p / "model.safetensors"
    junk.write_bytes(os.urandom(4096))
    replace(base(p), '"' + _model(p) + '"', f'"{junk}"')


# (what is wrong, how to break a working project, words the one line must contain)
CASES = [
    ("unknown key", lambda p: replace(base(p), "seed = 42", "seed = 42\nlearning_rat = 1e-4"), "learning_rat"),
    ("wrong type", lambda p: replace(base(p), "max_train_epochs = 4", 'max_train_epochs = "four"'),
     "max_train_epochs"),
    ("xformers", lambda p: replace(base(p), "xformers = false", "xformers = true"), "xformers"),
    ("an SD3-only key", lambda p: replace(base(p), "seed = 42", 'seed = 42\nweighting_scheme = "logit_normal"'),
     "weighting_scheme"),
    ("missing model", lambda p: replace(base(p), '"' + _model(p) + '"', '"/nowhere/sd15.safetensors"'),
     "/nowhere/sd15.safetensors"),
    ("random file as model", random_file_model, "model.safetensors"),
    ("folder without model_index.json", model_folder_without_index, "model_index.json"),
    ("missing dataset", lambda p: replace(base(p), str(p / "data" / "train"), str(p / "data" / "nope")),
     "data/nope"),
    ("corrupt image", corrupt_image, ".png"),
    ("empty dataset", empty_dataset, "no training images"),
    ("no N_name folders", flat_dataset, "no training images"),
    ("missing prompt file", lambda p: (p / "configs" / "prompts.txt").unlink(), "prompts.txt"),
    ("missing CLIP", lambda p: replace(p / "configs" / "evaluator.toml", "toyworld/assets/clip", "no/clip"),
     "no/clip"),
    ("weights do not sum to 1", lambda p: replace(p / "configs" / "evaluator.toml", "identity = 0.4",
                                                   "identity = 0.9"), "weights"),
    ("unknown search parameter", lambda p: (p / "configs" / "search_space.toml").open("a").write(
        "\n[network_dimm]\nchoices = [8, 16]\n"), "network_dimm"),
    ("low > high", lambda p: replace(p / "configs" / "search_space.toml", "low = 0.0001", "low = 0.5"),
     "learning_rate"),
    ("bad storage URL", lambda p: replace(p / "configs" / "study.toml", 'n_trials = 1',
                                          'n_trials = 1\nstorage = "mongodb://x/y"'), "mongodb://x/y"),
    ("missing references", lambda p: replace(p / "configs" / "evaluator.toml", "data/references", "data/refs"),
     "data/refs"),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    prepare(root, n_trials=1, say=lambda _: None)
    return root


def copy_project(template: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(template, dest)
    for path in (dest / "configs").glob("*.toml"):
        path.write_text(path.read_text().replace(str(template), str(dest)))
    return dest / "configs" / "study.toml"


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name,breaks,named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_stops_start_with_one_line_and_creates_nothing(template, tmp_path, monkeypatch, capsys,
                                                                  name, breaks, named):
    monkeypatch.chdir(tmp_path)
    cfg = copy_project(template, tmp_path / "p")
    breaks(tmp_path / "p")
    before = tree(tmp_path)
    assert main(["start", "--config", str(cfg), "--foreground"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora-search start: error:"), err
    assert named in err[0], err[0]
    assert tree(tmp_path) == before  # no study, folder or file was created


def test_check_study_passes_on_a_working_project_and_writes_nothing(template, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = copy_project(template, tmp_path / "p")
    before = tree(tmp_path)
    assert main(["check", "--study", "--config-file", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "CLIP local-dir:" in out and "12 images" in out
    assert tree(tmp_path) == before


def test_check_study_names_the_first_problem(template, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = copy_project(template, tmp_path / "p")
    corrupt_image(tmp_path / "p")
    assert main(["check", "--study", "--config-file", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "01.png cannot be read" in err, err


@pytest.mark.parametrize("command", [["status"], ["export", "--out", "best.toml"], ["resume", "--no-workers"],
                                     ["dashboard"]])
@pytest.mark.parametrize("storage", ["", "journal"])
def test_read_only_commands_on_a_missing_study_create_nothing(template, tmp_path, monkeypatch, capsys, command,
                                                              storage):
    monkeypatch.chdir(tmp_path)
    cfg = copy_project(template, tmp_path / "p")
    flags = ["--storage", f"journal:{tmp_path}/p/demo/journal.log"] if storage else []
    before = tree(tmp_path)
    assert main([command[0], "--config", str(cfg), "--study", "demo-typo", *flags, *command[1:]]) == 2
    assert "no study named 'demo-typo'" in capsys.readouterr().err
    assert tree(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_runs_folder_is_one_line(template, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = copy_project(template, tmp_path / "p")
    (tmp_path / "p").chmod(0o555)
    try:
        assert main(["start", "--config", str(cfg), "--foreground"]) == 2
    finally:
        (tmp_path / "p").chmod(0o755)
    assert "make it writable" in capsys.readouterr().err


def test_status_into_a_closed_pipe_is_quiet(template, tmp_path):
    import subprocess
    import sys

    from study_fixtures import REPO

    cfg = copy_project(template, tmp_path / "p")
    from search.settings import load_settings
    from search.study import open_study

    study = open_study(load_settings(cfg))
    for _ in range(300):
        study.enqueue_trial({"learning_rate": 1e-4})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(f"{sys.executable} -m search status --config {cfg} | head -1", shell=True, env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.startswith("study") or done.stdout.strip(), done.stdout
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_a_full_disk_is_one_line_with_the_fix(template, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    monkeypatch.chdir(tmp_path)
    cfg = copy_project(template, tmp_path / "p")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    before = tree(tmp_path)
    assert main(["start", "--config", str(cfg), "--foreground"]) == 2
    err = capsys.readouterr().err
    assert "no space left" in err and "free some space" in err
    assert tree(tmp_path) == before


def test_storage_that_cannot_be_created_leaves_nothing_behind(tmp_path, capsys):
    from search.errors import StorageError
    from search.study import open_storage

    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    with pytest.raises(StorageError, match="make its folder writable"):
        open_storage(f"sqlite:///{blocker}/demo/study.db")
    with pytest.raises(StorageError, match="make its folder writable"):
        open_storage(f"journal:{blocker}/demo/journal.log")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
