"""Step budget arithmetic, the seed-004 auto-steps rule, the dataset report and ``lora-search plan``."""

from pathlib import Path

import pytest
from PIL import Image

from search.cli import main
from training.config import TrainingConfig, load_training_config
from training.data import DatasetError
from training.planning import (apply_auto_steps, auto_steps, budget_warning, checkpoint_interval, config_budget,
                               dataset_report, epoch_budgets, steps_per_epoch)


def make_dataset(root: Path, folders: dict[str, int], captioned: int = 0, size=(64, 64)) -> Path:
    """``folders`` maps folder name -> image count; the first ``captioned`` images of each get a .txt."""
    for name, count in folders.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", size, (i % 255, 10, 10)).save(root / name / f"{i:03d}.png")
            if i < captioned:
                (root / name / f"{i:03d}.txt").write_text(f"caption {i}", encoding="utf-8")
    return root


def cfg(**kw) -> TrainingConfig:
    base = dict(resolution="64,64", bucket_reso_steps=8, min_bucket_reso=32, max_bucket_reso=128,
                caption_extension=".txt", train_batch_size=1)
    base.update(kw)
    return TrainingConfig(**base)


# --------------------------------------------------------------------------- seed-004 table


@pytest.mark.parametrize("images,steps,every", [(15, 600, 100), (30, 1200, 250), (43, 1720, 250),
                                                (60, 2400, 500), (100, 3500, 500)])
def test_auto_steps_matches_the_seed_table(images, steps, every):
    rule = auto_steps(images)
    assert (rule.max_train_steps, rule.save_every_n_steps) == (steps, every)
    assert rule.clamped == (images == 100)


def test_auto_steps_clamps_small_datasets_and_interval_edges():
    assert auto_steps(5).max_train_steps == 500 and auto_steps(5).clamped
    assert [checkpoint_interval(s) for s in (999, 1000, 2000, 2001)] == [100, 250, 250, 500]


def test_apply_auto_steps_writes_kohya_keys_and_drops_epoch_keys():
    values = {"max_train_epochs": 20, "save_every_n_epochs": 2, "sample_every_n_epochs": 2,
              "sample_prompts": "p.txt", "network_dim": 64}
    out = apply_auto_steps(values, 43)
    assert out == {"sample_prompts": "p.txt", "network_dim": 64, "max_train_steps": 1720,
                   "save_every_n_steps": 250, "sample_every_n_steps": 250}
    assert values["max_train_epochs"] == 20  # the input is not changed
    TrainingConfig(**out)  # still a valid config
    assert "sample_every_n_steps" not in apply_auto_steps({"network_dim": 8}, 15)


# --------------------------------------------------------------------------- budget arithmetic


def test_steps_per_epoch_rounds_up_partial_accumulation():
    assert [steps_per_epoch(b, 2) for b in (10, 11, 1)] == [5, 6, 1]


def test_budget_follows_the_documented_formula(tmp_path):
    root = make_dataset(tmp_path / "d", {"3_ohwx woman": 7, "1_style": 2})
    c = cfg(train_data_dir=str(root), train_batch_size=2, gradient_accumulation_steps=2, max_train_epochs=16)
    report = dataset_report(c)
    assert (report.images, report.examples_per_epoch) == (9, 23)
    # one bucket: ceil(23 / 2) = 12 batches, ceil(12 / 2) = 6 optimizer steps per epoch
    assert report.batches_per_epoch == 12
    budgets = epoch_budgets(report, c, (12, 16, 20))
    assert [(b.epochs, b.steps) for b in budgets] == [(12, 72), (16, 96), (20, 120)]
    assert budgets[1].steps_per_image == pytest.approx(96 / 23)
    assert budgets[1].views_per_image == pytest.approx(96 * 2 * 2 / 9)
    assert [b.epochs for b in epoch_budgets(report, cfg(max_train_epochs=7, train_data_dir=str(root)), (12,))] == [7, 12]


def test_buckets_are_batched_separately(tmp_path):
    root = make_dataset(tmp_path / "d", {"1_a": 3})
    make_dataset(root, {"1_b": 3}, size=(128, 64))
    report = dataset_report(cfg(train_data_dir=str(root), train_batch_size=2, enable_bucket=True))
    assert len(report.buckets) == 2
    assert report.batches_per_epoch == 4  # ceil(3/2) per bucket, not ceil(6/2)


def test_seed_004_under_training_is_flagged_with_the_fix(tmp_path):
    root = make_dataset(tmp_path / "d", {"10_style": 43})
    c = cfg(train_data_dir=str(root), max_train_steps=1720, train_batch_size=2)
    report = dataset_report(c)
    budget = config_budget(report, c)
    assert budget.steps_per_image == pytest.approx(4.0)  # 1720 / (43 x 10)
    warning = budget_warning(budget, report, c)
    assert "4.0 steps per image is below 30" in warning
    assert "max_train_steps = 17200" in warning and "1_<name>" in warning and "1720" in warning
    one_repeat = make_dataset(tmp_path / "e", {"1_style": 43})
    c1 = cfg(train_data_dir=str(one_repeat), max_train_steps=1720, train_batch_size=2)
    r1 = dataset_report(c1)
    assert config_budget(r1, c1).steps_per_image == pytest.approx(40.0)
    assert budget_warning(config_budget(r1, c1), r1, c1) is None


def test_over_training_and_epoch_fix(tmp_path):
    root = make_dataset(tmp_path / "d", {"1_x": 10})
    c = cfg(train_data_dir=str(root), max_train_epochs=100)  # batch 1: 100 steps per image
    report = dataset_report(c)
    warning = budget_warning(config_budget(report, c), report, c)
    assert "100.0 steps per image is above 60" in warning and "max_train_epochs = 40" in warning


def test_report_folders_captions_and_trigger_tokens(tmp_path):
    root = make_dataset(tmp_path / "d", {"5_ohwx woman": 4, "2_ohwx woman": 2, "1_red car": 1}, captioned=1)
    report = dataset_report(cfg(), root)
    by_name = {f.name: f for f in report.folders}
    assert (by_name["5_ohwx woman"].repeats, by_name["5_ohwx woman"].captions_missing) == (5, 3)
    assert report.trigger_tokens == ["red car", "ohwx woman"]
    assert report.resolutions == {(64, 64): 7} and report.buckets == {(64, 64): 7}


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "is not a folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no training images found"),
])
def test_missing_or_empty_dataset_is_one_clear_error(tmp_path, make, message):
    with pytest.raises(DatasetError, match=message):
        dataset_report(cfg(), make(tmp_path))


# --------------------------------------------------------------------------- the CLI


def write_base(tmp_path: Path, **extra) -> Path:
    lines = ['resolution = "64,64"', "bucket_reso_steps = 8", "min_bucket_reso = 32", "max_bucket_reso = 128",
             'caption_extension = ".txt"', "train_batch_size = 1", "max_train_epochs = 20",
             "save_every_n_epochs = 2"] + [f"{k} = {v!r}" for k, v in extra.items()]
    path = tmp_path / "base.toml"
    path.write_text("\n".join(lines).replace("'", '"') + "\n", encoding="utf-8")
    return path


def test_plan_cli_prints_report_budget_and_vram(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", {"2_ohwx": 3})
    assert main(["plan", str(root), "--config", str(write_base(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "3 images in 1 folder(s), 6 examples per epoch" in out
    assert "trigger tokens: 'ohwx'" in out
    for epochs in (12, 16, 20, 24):
        assert f"{epochs:>7} {epochs * 6:>8}" in out  # batch 1: 6 steps per epoch
    assert "<- this config" in out and "VRAM estimate:" in out
    # 20 epochs x 6 steps / 6 examples = 20 steps per image: under-trained, with the epoch fix
    assert "warning: 20.0 steps per image is below 30" in out and "max_train_epochs = 40" in out


def test_plan_cli_auto_steps_writes_a_config(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", {"1_ohwx": 15})
    out_path = tmp_path / "planned.toml"
    code = main(["plan", str(root), "--config", str(write_base(tmp_path)), "--preset", "style",
                 "--auto-steps", "--out", str(out_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "max_train_steps 600" in out and "save_every_n_steps 100" in out
    written = load_training_config(out_path)
    assert (written.max_train_steps, written.save_every_n_steps, written.max_train_epochs) == (600, 100, None)
    assert written.save_every_n_epochs is None and written.network_dim == 16  # the style preset
    assert written.train_data_dir == str(root)


@pytest.mark.parametrize("args,message", [
    (["--preset", "portrait"], "unknown preset 'portrait'; available presets: character, concept, deturbo, style, turbo"),
    ([], "no training images found"),
])
def test_plan_cli_bad_input_is_one_line_and_nonzero(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    code = main(["plan", str(tmp_path / "empty"), "--config", str(write_base(tmp_path)), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and message in err[0]


def test_plan_cli_missing_dir(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope"), "--config", str(write_base(tmp_path))]) != 0
    assert "is not a folder; check the path" in capsys.readouterr().err
