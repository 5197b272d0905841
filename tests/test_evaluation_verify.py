"""``verify-dataset``: multi-reference CLIP filter, its report, and moving rejected images."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from evaluation import verify_dataset
from sample_runs import save
from search.cli import main
from tiny_clip import flat_image, pattern_image
from training.errors import LoraSearchError


def make_dataset(root: Path) -> tuple[Path, Path]:
    """References (two patterns) and a nested kohya dataset: one copy of a reference, one red square."""
    refs = root / "refs"
    save(pattern_image(1), refs / "a.png")
    save(pattern_image(2), refs / "b.png")
    data = root / "data"
    save(pattern_image(2), data / "10_ohwx" / "good.png")
    (data / "10_ohwx" / "good.txt").write_text("ohwx, good")
    save(flat_image((230, 20, 20)), data / "10_ohwx" / "bad.png")
    (data / "10_ohwx" / "bad.txt").write_text("ohwx, bad")
    (data / "10_ohwx" / "bad.caption").write_text("ohwx, bad caption")
    return data, refs


def test_copy_of_a_reference_passes_and_a_different_image_fails(tmp_path, tiny_clip_model):
    data, refs = make_dataset(tmp_path)
    report = verify_dataset(data, refs, tiny_clip_model, threshold=0.99)
    by_name = {c.path.name: c for c in report.checks}
    assert by_name["good.png"].passed and by_name["good.png"].best_similarity == pytest.approx(1.0, abs=1e-5)
    assert by_name["good.png"].best_reference.name == "b.png"
    assert not by_name["bad.png"].passed and by_name["bad.png"].best_similarity < 0.99
    assert report.summary() == "1 of 2 passed (threshold 0.99)"
    rows = list(csv.DictReader(report.report_path.open()))
    assert report.report_path == data / "clip_verify_report.csv"
    assert {r["image"]: r["passed"] for r in rows} == {"10_ohwx/good.png": "yes", "10_ohwx/bad.png": "no"}
    assert (data / "10_ohwx" / "bad.png").is_file()  # nothing moved without --move-rejected


def test_rejected_images_move_with_captions_and_never_overwrite(tmp_path, tiny_clip_model):
    data, refs = make_dataset(tmp_path)
    rejected = tmp_path / "rejected"
    save(flat_image((1, 2, 3)), rejected / "10_ohwx" / "bad.png")  # an earlier rejection of the same name
    report = verify_dataset(data, refs, tiny_clip_model, threshold=0.99, move_rejected=rejected)
    assert not (data / "10_ohwx" / "bad.png").exists() and not (data / "10_ohwx" / "bad.txt").exists()
    assert (data / "10_ohwx" / "good.png").is_file() and (data / "10_ohwx" / "good.txt").is_file()
    moved = rejected / "10_ohwx"
    assert Image.open(moved / "bad.png").getpixel((0, 0)) == (1, 2, 3)  # the earlier file is untouched
    assert Image.open(moved / "bad-1.png").getpixel((0, 0)) == (230, 20, 20)
    assert (moved / "bad-1.txt").read_text() == "ohwx, bad"
    assert (moved / "bad-1.caption").read_text() == "ohwx, bad caption"
    assert [c.moved_to for c in report.checks if not c.passed] == [moved / "bad-1.png"]


def test_bad_inputs_are_clear_errors(tmp_path, tiny_clip_model):
    data, refs = make_dataset(tmp_path)
    with pytest.raises(LoraSearchError, match="reference folder .*missing not found"):
        verify_dataset(data, tmp_path / "missing", tiny_clip_model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraSearchError, match="dataset folder .*empty has no images"):
        verify_dataset(tmp_path / "empty", refs, tiny_clip_model)
    with pytest.raises(LoraSearchError, match="--threshold 2"):
        verify_dataset(data, refs, tiny_clip_model, threshold=2)


def test_verify_dataset_cli(tmp_path, tiny_clip_dir, capsys):
    data, refs = make_dataset(tmp_path)
    report = tmp_path / "report.csv"
    code = main(["verify-dataset", str(data), "--references", str(refs), "--clip-model", f"local-dir:{tiny_clip_dir}",
                 "--threshold", "0.99", "--move-rejected", str(tmp_path / "out"), "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0 and "1 of 2 passed (threshold 0.99)" in out and report.is_file()
    assert (tmp_path / "out" / "10_ohwx" / "bad.png").is_file()
    assert main(["verify-dataset", str(tmp_path / "nope"), "--references", str(refs),
                 "--clip-model", f"local-dir:{tiny_clip_dir}"]) == 2
    assert "dataset folder" in capsys.readouterr().err
