"""Step checkpoints (save_every_n_steps) and step samples in ``evaluate``: order, best, scores.json, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from evaluation import evaluate_run, read_scores, settings_from_dict
from search.cli import main
from sample_runs import SETTINGS_TOML, make_run, save
from tiny_clip import flat_image, pattern_image

STEP_CKPT = "demo-step00000003.safetensors"


def lora_file(path: Path, epochs_done: int, steps: int) -> Path:
    """A LoRA file carrying the ``ss_epoch``/``ss_steps`` metadata the trainer and sd-scripts write."""
    save_file({"x": torch.zeros(1)}, str(path), metadata={"ss_epoch": str(epochs_done), "ss_steps": str(steps)})
    return path


def step_run(root: Path) -> Path:
    """Two steps per epoch: step 1 (flat grey), epoch 1 (flat), step 3 (the references: the best), epoch 2.

    Step 3 has a checkpoint saved after one epoch; step 1 has samples only, so its place comes from the
    steps per epoch the epoch checkpoint records.
    """
    grey = [flat_image((128, 128, 128))] * 3
    run = make_run(root, {1: grey, 2: [pattern_image(7), pattern_image(8), pattern_image(9)]})
    for step, images in {1: grey, 3: [pattern_image(1), pattern_image(2), pattern_image(1)]}.items():
        for index, image in enumerate(images):
            save(image, run / "sample" / f"demo_s{step:08d}_{index:02d}.png")
    lora_file(run / "demo-000001.safetensors", 1, 2)
    lora_file(run / STEP_CKPT, 1, 3)
    lora_file(run / "demo.safetensors", 2, 4)
    return run


def test_step_checkpoints_are_scored_in_training_order_and_can_be_best(tmp_path, evaluator_settings):
    run = step_run(tmp_path)
    scores = evaluate_run(run, evaluator_settings)
    assert [c.label for c in scores.checkpoints] == ["step 1", "epoch 1", "step 3", "epoch 2"]
    assert scores.best.label == "step 3" and scores.best.checkpoint == run / STEP_CKPT
    assert scores.best.epoch == 1  # saved after one completed epoch
    assert [e.epoch for e in scores.epochs] == [1, 2] and [s.step for s in scores.steps] == [1, 3]
    assert scores.generated == []  # no prompt file in the config: nothing to sample with
    assert (run / "contact_sheet_s00000003.png").is_file() and (run / "contact_sheet_s00000001.png").is_file()
    assert scores.best.images[0].path == "demo_s00000003_00.png"


def test_scores_json_keeps_epoch_entries_and_adds_steps_in_order(tmp_path, evaluator_settings):
    run = step_run(tmp_path)
    evaluate_run(run, evaluator_settings)
    data = json.loads((run / "scores.json").read_text())
    assert [c["label"] for c in data["checkpoints"]] == ["step 1", "epoch 1", "step 3", "epoch 2"]
    assert data["best"]["label"] == "step 3" and data["best"]["checkpoint"] == STEP_CKPT
    # What readers of epochs always found: epoch entries only, and the best of them.
    assert [e["epoch"] for e in data["epochs"]] == [1, 2] and data["best_epoch"] == 2
    assert data["best_total"] == pytest.approx(data["epochs"][1]["total"])
    assert data["epochs"][0]["contact_sheet"] == "contact_sheet_e000001.png"
    assert [(s["step"], s["epoch"]) for s in data["steps"]] == [(1, 0), (3, 1)]
    assert data["steps"][1]["total"] == pytest.approx(data["best"]["total"])
    assert data["best"]["total"] > data["epochs"][1]["total"]
    again = read_scores(run)
    assert [e.label for e in again] == ["step 1", "epoch 1", "step 3", "epoch 2"]
    assert again[2].checkpoint == run / STEP_CKPT and again[0].checkpoint is None


def test_old_scores_json_without_steps_reads_back(tmp_path, evaluator_settings):
    run = step_run(tmp_path)
    evaluate_run(run, evaluator_settings)
    data = json.loads((run / "scores.json").read_text())
    old = {k: data[k] for k in ("best_epoch", "best_total", "weights", "clip_model")}
    old["epochs"] = [{k: v for k, v in e.items() if k not in ("step", "checkpoint")} for e in data["epochs"]]
    (run / "scores.json").write_text(json.dumps(old))
    assert [(e.label, e.step, e.checkpoint) for e in read_scores(run)] == [("epoch 1", None, None),
                                                                          ("epoch 2", None, None)]


def test_evaluate_cli_lists_steps_in_order_and_names_the_best_checkpoint(tmp_path, tiny_clip_dir, capsys):
    run = step_run(tmp_path)
    config = tmp_path / "evaluator.toml"
    config.write_text(SETTINGS_TOML)
    assert main(["evaluate", str(run), "--evaluator-config", str(config), "--clip-model", f"local-dir:{tiny_clip_dir}",
                 "--references", str(tmp_path / "refs")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "checkpoint"
    assert [" ".join(line.split()[:2]) for line in out[1:5]] == ["step 1", "epoch 1", "step 3", "epoch 2"]
    assert out[3].endswith("* best") and sum("best" in line for line in out[1:5]) == 1
    assert out[5].startswith("best step 3 (total ") and STEP_CKPT in out[5]


def test_clip_scorer_keeps_step_entries_when_it_scores_an_epoch(tmp_path, evaluator_settings, tiny_clip_dir):
    from search.scoring import ClipScorer

    run = step_run(tmp_path)
    evaluate_run(run, evaluator_settings)
    config = tmp_path / "evaluator.toml"
    config.write_text(f'references = "{(tmp_path / "refs").as_posix()}"\n[clip]\nmodel = "local-dir:{tiny_clip_dir}"\n'
                      f'pretrained = ""\n' + SETTINGS_TOML)
    result = ClipScorer(config).score(run, run / "config.toml", 2, run / "demo.safetensors")
    assert result.epoch == 2
    assert [e.label for e in read_scores(run)] == ["step 1", "epoch 1", "step 3", "epoch 2"]


def test_step_with_unknown_epochs_sorts_by_step_before_the_first_epoch(tmp_path, evaluator_settings):
    run = make_run(tmp_path, {1: [pattern_image(1)] * 3})
    for step in (5, 2):
        for index in range(3):
            save(pattern_image(2), run / "sample" / f"demo_s{step:08d}_{index:02d}.png")
    # No checkpoint records how many steps an epoch has: only the step number orders these.
    scores = evaluate_run(run, evaluator_settings)
    assert [c.label for c in scores.checkpoints] == ["step 2", "step 5", "epoch 1"]


@pytest.mark.slow
def test_tiny_run_with_step_checkpoints_is_scored_in_order_and_missing_samples_generated(
        tmp_path, make_config, tiny_clip_dir):
    from training.trainer import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("{trigger}, a cat sitting --w 64 --h 64 --s 2 --d 1\n"
                       "{trigger}, a cat running --w 64 --h 64 --s 2 --d 2\n")
    # Batch 1 over two images: two steps an epoch. Step checkpoints 1-3 (the last step is the final
    # file); samples during training at steps 2 and 4 only, none at epoch ends.
    cfg = make_config(train_batch_size=1, save_every_n_epochs=1, save_every_n_steps=1, sample_every_n_steps=2,
                      sample_prompts=str(prompts), metadata_trigger_phrase="ohwx", sample_sampler="euler_a")
    train(cfg)
    run = Path(cfg.output_dir)
    trained = {p.name for p in run.glob("sample/*.png")}
    assert trained == {f"lora_s{s:08d}_{i:02d}.png" for s in (2, 4) for i in (0, 1)}
    during = np.asarray(Image.open(run / "sample" / "lora_s00000002_00.png")).astype(int)
    (run / "sample" / "lora_s00000002_00.png").unlink()
    (run / "sample" / "lora_s00000002_01.png").unlink()  # step 2 must be sampled again from its checkpoint

    refs = tmp_path / "refs"
    save(pattern_image(1), refs / "ref.png")
    settings = settings_from_dict({"references": str(refs)}).with_overrides(
        clip_model=f"local-dir:{tiny_clip_dir}", clip_pretrained="")
    scores = evaluate_run(run, settings)
    order = ["step 1", "step 2", "epoch 1", "step 3", "step 4", "epoch 2"]
    assert [c.label for c in scores.checkpoints] == order
    assert [p.label for p in scores.generated] == ["step 1", "step 2", "epoch 1", "step 3", "epoch 2"]
    assert {p.name for p in run.glob("sample/*.png")} == trained | {
        f"lora_{tag}_{i:02d}.png" for tag in ("s00000001", "s00000002", "e000001", "s00000003", "e000002")
        for i in (0, 1)}
    again = np.asarray(Image.open(run / "sample" / "lora_s00000002_00.png")).astype(int)
    assert np.abs(during - again).max() <= 1  # the image training made at that step
    by_label = {c.label: c for c in scores.checkpoints}
    assert by_label["step 3"].checkpoint == run / "lora-step00000003.safetensors" and by_label["step 3"].epoch == 1
    assert by_label["step 4"].checkpoint is None and by_label["step 4"].epoch == 1
    assert by_label["epoch 2"].checkpoint == run / "lora.safetensors"
    data = json.loads((run / "scores.json").read_text())
    assert [c["label"] for c in data["checkpoints"]] == order and [e["epoch"] for e in data["epochs"]] == [1, 2]
    assert data["best"]["label"] == scores.best.label
    assert data["steps"][0]["images"][0]["prompt"] == "a cat sitting"

    # The study's scorer samples an unsampled epoch through the same path, and keeps the step entries.
    from search.scoring import ClipScorer

    for index in (0, 1):
        (run / "sample" / f"lora_e000001_{index:02d}.png").unlink()
    evaluator_config = tmp_path / "evaluator.toml"
    evaluator_config.write_text(f'references = "{refs.as_posix()}"\n[clip]\nmodel = "local-dir:{tiny_clip_dir}"\n'
                                'pretrained = ""\n')
    result = ClipScorer(evaluator_config).score(run, run / "config.toml", 1, run / "lora-000001.safetensors")
    assert result.total == pytest.approx(by_label["epoch 1"].total, abs=1e-3)  # the same images again
    assert (run / "sample" / "lora_e000001_00.png").is_file()
    assert [e.label for e in read_scores(run)] == order
