"""``lora-search check``: exit 0 safe, 1 unsafe with every violated constraint, 2 unusable file."""

from __future__ import annotations

import subprocess
import sys

from search.cli import main
from study_fixtures import REPO

BASE = (REPO / "configs" / "base.toml").read_text()


def test_base_config_is_safe(capsys):
    assert main(["check", str(REPO / "configs" / "base.toml")]) == 0
    assert "safe (7 safety constraints checked)" in capsys.readouterr().out


def test_unsafe_config_lists_every_violation(tmp_path, capsys):
    path = tmp_path / "hot.toml"
    # lr 1.3e-4 with 8-bit, warmup 50, no accumulation, alpha 60/64: constraints 1, 4, 5, 6, 7
    path.write_text(BASE.replace("unet_lr = 8e-5", "unet_lr = 1.3e-4").replace("lr_warmup_steps = 100", "lr_warmup_steps = 50")
                    .replace("gradient_accumulation_steps = 2", "gradient_accumulation_steps = 1")
                    .replace("network_alpha = 32", "network_alpha = 60"))
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "UNSAFE, 5 of 7" in out
    for cid in (1, 4, 5, 6, 7):
        assert f"constraint {cid} (" in out
    assert "constraint 2 (" not in out and "constraint 3 (" not in out


def test_unusable_files_exit_2_with_one_line(tmp_path, capsys):
    cases = {
        "missing.toml": None,
        "broken.toml": "[model\n",
        "unknown.toml": BASE + "\nnetwork_dimension = 4\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        assert main(["check", str(path)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err, err
    assert "did you mean 'network_dim'" in err


def test_console_script_runs_as_installed():
    done = subprocess.run([sys.executable, "-m", "search", "check", str(REPO / "configs" / "base.toml")],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "safe" in done.stdout
