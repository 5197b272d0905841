"""Scoring a run folder: scores.json, contact sheets, the best epoch, and the ``evaluate`` CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

import evaluation.evaluator as evaluate_module
from evaluation import Evaluator, evaluate_run, settings_from_dict
from sample_runs import SETTINGS_TOML, make_run, save
from search.cli import main
from tiny_clip import flat_image, pattern_image
from training.errors import LoraSearchError

def good_and_bad_run(root: Path) -> Path:
    """Epoch 2 reproduces the references (sharp, colourful); epoch 1 is flat grey."""
    return make_run(root, {1: [flat_image((128, 128, 128))] * 3,
                           2: [pattern_image(1), pattern_image(2), pattern_image(1)]})


def test_score_epoch_combines_components_and_writes_a_contact_sheet(tmp_path, evaluator_settings):
    run = good_and_bad_run(tmp_path)
    score = Evaluator(evaluator_settings).score_epoch(run, 2)
    assert score.epoch == 2 and set(score.components) == {"identity", "pose_variety", "style",
                                                          "prompt_adherence", "technical"}
    assert all(0.0 <= v <= 1.0 for v in score.components.values())
    weights = evaluator_settings.weights.as_dict()
    assert score.total == pytest.approx(sum(weights[k] * v for k, v in score.components.items()))
    assert score.components["identity"] == pytest.approx(1.0, abs=1e-5)  # samples are the references
    assert [im.index for im in score.images] == [0, 1, 2]
    assert score.images[1].prompt == "a character sitting, indoors"  # trigger removed for CLIP-T
    assert score.images[0].path == "demo_e000002_00.png" and "laplacian_variance" in score.images[0].technical_details
    with Image.open(score.contact_sheet) as sheet:
        assert sheet.format == "PNG" and sheet.width > 2 * 256 and sheet.height > 2 * 256
    assert score.contact_sheet == run / "contact_sheet_e000002.png"


def test_evaluate_run_writes_scores_json_and_picks_the_best_epoch(tmp_path, evaluator_settings):
    run = good_and_bad_run(tmp_path)
    scores = evaluate_run(run, evaluator_settings)
    assert [e.epoch for e in scores.epochs] == [1, 2] and scores.best_epoch == 2
    data = json.loads((run / "scores.json").read_text())
    assert data["best_epoch"] == 2 and data["best_total"] == pytest.approx(scores.best.total)
    assert [e["epoch"] for e in data["epochs"]] == [1, 2]
    first = data["epochs"][0]
    assert first["contact_sheet"] == "contact_sheet_e000001.png" and len(first["images"]) == 3
    assert first["total"] < data["epochs"][1]["total"]
    assert first["components"]["technical"] == pytest.approx(0.4)  # flat grey: only exposure and clipping
    for epoch in (1, 2):
        assert (run / f"contact_sheet_e{epoch:06d}.png").is_file()
    assert not list(run.glob(".*.tmp"))


def test_evaluator_loads_clip_and_references_once(tmp_path, evaluator_settings, monkeypatch):
    run = good_and_bad_run(tmp_path)
    loads, scans = [], []
    real_load, real_find = evaluate_module.load_clip, evaluate_module.find_images
    monkeypatch.setattr(evaluate_module, "load_clip", lambda s: loads.append(s) or real_load(s))
    monkeypatch.setattr(evaluate_module, "find_images", lambda *a: scans.append(a[0]) or real_find(*a))
    evaluator = Evaluator(evaluator_settings)
    evaluator.score_epoch(run, 1)
    evaluator.score_epoch(run, 2)
    assert len(loads) == 1
    assert sorted(p.name for p in scans) == ["refs", "train"]  # references and training images, once each


def test_style_references_folder_replaces_training_images(tmp_path, evaluator_settings):
    run = good_and_bad_run(tmp_path)
    save(pattern_image(1), tmp_path / "style" / "s.png")
    plain = Evaluator(evaluator_settings).score_epoch(run, 2)
    styled_settings = dataclasses.replace(evaluator_settings, style_references=str(tmp_path / "style"))
    styled = Evaluator(styled_settings).score_epoch(run, 2)
    assert styled.images[0].style == pytest.approx(1.0, abs=1e-5)  # sample 0 is the one style image
    assert plain.images[0].style < styled.images[0].style


def test_run_errors_are_one_clear_line(tmp_path, evaluator_settings):
    with pytest.raises(LoraSearchError, match="run folder .* not found"):
        evaluate_run(tmp_path / "missing", evaluator_settings)
    empty = make_run(tmp_path, {})
    with pytest.raises(LoraSearchError, match="no sample images"):
        evaluate_run(empty, evaluator_settings)
    with pytest.raises(LoraSearchError, match="epoch 3 has no samples"):
        Evaluator(evaluator_settings).score_epoch(empty, 3)
    save(pattern_image(1), empty / "sample" / "demo_e000001_00.png")
    no_refs = dataclasses.replace(evaluator_settings, references=str(tmp_path / "nope"))
    with pytest.raises(LoraSearchError, match="reference folder .*nope not found; .*--references DIR"):
        evaluate_run(empty, no_refs)


def test_evaluate_cli_prints_the_table_and_marks_the_best(tmp_path, tiny_clip_dir, capsys):
    run = good_and_bad_run(tmp_path)
    config = tmp_path / "evaluator.toml"
    config.write_text(SETTINGS_TOML)
    args = ["evaluate", str(run), "--evaluator-config", str(config), "--clip-model", f"local-dir:{tiny_clip_dir}",
            "--references", str(tmp_path / "refs")]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["checkpoint", "identity", "pose_variety", "style", "prompt_adherence", "technical",
                              "total"]
    rows = {" ".join(line.split()[:2]): line for line in out[1:3]}
    assert rows["epoch 2"].endswith("* best") and "best" not in rows["epoch 1"]
    assert "best epoch 2" in out[3] and (run / "scores.json").is_file()


def test_evaluate_cli_fails_cleanly_on_an_empty_run(tmp_path, tiny_clip_dir, capsys):
    empty = make_run(tmp_path, {})
    code = main(["evaluate", str(empty), "--clip-model", f"local-dir:{tiny_clip_dir}",
                 "--references", str(tmp_path / "refs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("lora-search evaluate: error:") and "no sample images" in err
    assert len(err.splitlines()) == 1 and not (empty / "scores.json").exists()


@pytest.mark.slow
def test_evaluate_samples_checkpoints_of_a_tiny_training_run(tmp_path, make_config, tiny_clip_dir):
    from training.trainer import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("{trigger}, a cat sitting --w 64 --h 64 --s 2 --d 1\n"
                       "{trigger}, a cat running --w 64 --h 64 --s 2 --d 2\n")
    cfg = make_config(save_every_n_epochs=1, sample_prompts=str(prompts), metadata_trigger_phrase="ohwx")
    train(cfg)
    run = Path(cfg.output_dir)
    assert not list(run.glob("sample/*.png"))  # no sampling during training: evaluate must do it
    refs = tmp_path / "refs"
    save(pattern_image(1), refs / "ref.png")
    settings = settings_from_dict({"references": str(refs)}).with_overrides(
        clip_model=f"local-dir:{tiny_clip_dir}", clip_pretrained="")
    scores = evaluate_run(run, settings)
    assert scores.generated_epochs == [1, 2] and [e.epoch for e in scores.epochs] == [1, 2]
    assert sorted(p.name for p in run.glob("sample/*.png")) == [
        "lora_e000001_00.png", "lora_e000001_01.png", "lora_e000002_00.png", "lora_e000002_01.png"]
    data = json.loads((run / "scores.json").read_text())
    assert data["best_epoch"] in (1, 2) and data["epochs"][0]["images"][0]["prompt"] == "a cat sitting"
    assert (run / "contact_sheet_e000002.png").is_file()


def test_checkpoints_without_prompt_file_are_not_sampled(tmp_path, evaluator_settings):
    run = good_and_bad_run(tmp_path)
    (run / "demo-000003.safetensors").write_bytes(b"")  # sample_prompts unset: nothing to sample with
    scores = evaluate_run(run, evaluator_settings)
    assert scores.generated_epochs == [] and [e.epoch for e in scores.epochs] == [1, 2]


def test_scores_json_reads_back_into_the_same_epochs(tmp_path, evaluator_settings):
    from evaluation import read_scores

    run = good_and_bad_run(tmp_path)
    written = evaluate_run(run, evaluator_settings)
    again = read_scores(run)
    assert [e.epoch for e in again] == [e.epoch for e in written.epochs]
    assert [e.total for e in again] == [e.total for e in written.epochs]
    assert again[0].images[0].prompt == written.epochs[0].images[0].prompt
    assert read_scores(tmp_path / "nowhere") == []
