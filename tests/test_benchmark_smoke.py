"""The training-step benchmark's CPU smoke mode runs end to end and reports both variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import loaded_benchmark


@pytest.fixture(scope="module")
def bench():
    yield from loaded_benchmark("train_step.py")


def test_smoke_prints_table_and_writes_json(bench, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results" / "bench.json"
    assert bench.main(["--smoke", "--steps", "2", "--warmup", "0", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("arch"))
    assert lines[header].split() == ["arch", "variant", "batch", "ms/step", "img/s", "x", "ref", "TFLOP/step",
                                      "TFLOP/s", "MFU", "%", "peak", "GiB", "1st", "s", "compiled", "syncs"]
    rows = [line.split() for line in lines[header + 1:header + 9]]
    assert {(r[0], r[1], r[2]) for r in rows} == {(a, v, b) for a in ("sd15", "sdxl")
                                                  for v in ("reference", "trainer") for b in ("1", "2")}
    assert all(float(r[3]) > 0 for r in rows)  # ms/step measured
    assert all(r[5] == "1.00" for r in rows if r[1] == "reference")
    assert all(r[9] == "n/a" and r[-1] == "n/a" for r in rows)  # no GPU memory or syncs to report on the CPU
    assert all(r[-2] == ("n/a" if r[1] == "reference" else "no") for r in rows)  # the CPU default: not compiled
    assert lines[-1] == f"wrote {out}"

    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["smoke"] is True and data["rank"] == 64
    results = data["results"]
    assert len(results) == 8 and all(len(r["step_ms"]) == 2 and r["error"] is None for r in results)
    assert all(r["first_step_s"] > 0 for r in results)
    # FLOPs grow with the batch and both variants are measured against the same model FLOPs.
    flops = {(r["arch"], r["variant"], r["batch"]): r["model_tflop"] for r in results}
    for arch in ("sd15", "sdxl"):
        assert flops[(arch, "reference", 2)] == pytest.approx(2 * flops[(arch, "reference", 1)], rel=0.05)
        assert flops[(arch, "trainer", 1)] == flops[(arch, "reference", 1)] > 0


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_reference_trains_the_trainers_lora_modules(bench, kind: str) -> None:
    """The eager reference puts LoRA on exactly the layers the trainer's kohya network does."""
    import torch

    from training.network import target_module_names

    unet, _ = bench.reference_model(kind, True, torch.device("cpu"))
    lora = sorted(name for name, module in unet.named_modules() if hasattr(module, "lora_A"))
    assert lora == target_module_names(bench.build_unet(kind, True, torch.device("cpu")), ["Transformer2DModel"])


def test_bad_batches_is_a_usage_error(bench, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--smoke", "--batches", "1,x"])
    assert exc.value.code == 2
    assert "--batches '1,x'" in capsys.readouterr().err


def test_optional_trainer_variants_run(bench, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The trainer's plain step and the text-encoder-trained set-up run too, and bad names are refused."""
    out = tmp_path / "variants.json"
    args = ["--smoke", "--arch", "sd15", "--batches", "1", "--steps", "1", "--warmup", "0", "--out", str(out)]
    assert bench.main(args + ["--variants", "reference,trainer-eager,trainer-te,trainer-dynamic"]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["reference", "trainer-eager", "trainer-te", "trainer-dynamic"]
    assert all(r["ms_per_step"] > 0 and r["error"] is None for r in results)
    assert results[2]["speedup"] is not None  # measured against the same run's reference
    with pytest.raises(SystemExit):
        bench.main(args + ["--variants", "trainer,fastest"])
    assert "--variants fastest" in capsys.readouterr().err
