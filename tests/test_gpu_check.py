"""benchmarks/gpu_check.sh --smoke: the prepared GPU check runs end to end on the CPU and writes its one JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_mode_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    # python3 on PATH is this interpreter, as it would be the machine's own on the GPU machine.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "compile-cache")}
    proc = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == f"wrote {out}"
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["skipped"] == []

    for name, batches in (("sd15_step", {1, 2}), ("sdxl_step", {1})):
        rows = report[name]["results"]
        assert {(r["variant"], r["batch"]) for r in rows} == {(v, b) for v in ("reference", "trainer") for b in batches}
        assert all(r["ms_per_step"] > 0 and r["error"] is None for r in rows)

    dit = report["dit_step"]["results"]
    assert {r["arch"] for r in dit} == {"sd3", "zimage"} and all(r["s_per_step"] > 0 for r in dit)
    assert all(r["estimate_gib"] > 0 and r["checkpointing"] for r in dit)

    train = report["train"]
    straight, resume = train["straight"], train["resume"]
    assert straight["exit"] == 0 and len(straight["epoch_losses"]) == 2 and straight["loss_finite"]
    assert {"lora-000001.safetensors", "lora.safetensors", "sample/prompts.json"} <= set(train["files"])
    assert sum(f.startswith("sample/lora_e") for f in train["files"]) == 2  # one prompt after each epoch
    assert train["states"] == ["epoch-000001", "epoch-000002"]
    # Resumed from the epoch-1 state it trains epoch 2 alone and ends on the same weights.
    assert resume["exit"] == 0 and len(resume["epoch_losses"]) == 1 and resume["loss_finite"]
    assert resume["epoch_losses"][0] == straight["epoch_losses"][1]
    assert resume["max_abs_weight_diff"] == 0.0 and resume["weights_equal"] is True

    targets = report["targets"]
    assert set(targets) == {"sd15_b1_speedup", "sd15_b4_speedup", "sd15_b4_mfu", "sdxl_b1_speedup"}
    assert targets["sd15_b4_mfu"]["value"] is None  # no MFU without a known peak (the CPU)
    assert math.isfinite(targets["sdxl_b1_speedup"]["value"]) and targets["sdxl_b1_speedup"]["target"] == 3.0
