"""A stand-in scorer: a deterministic score from the trial's learning rate, dim and the epoch.

Prints a log line and then the score last, as the command scorer expects. The best learning rate is
9e-5, and later epochs score a little higher, so tests know which trial and epoch should win.
"""

import math
import os
import sys
import time
import tomllib
from pathlib import Path

if os.environ.get("FAKE_SCORE_HANG_MARKER"):  # lets a test kill its worker in the middle of an evaluation
    Path(os.environ["FAKE_SCORE_HANG_MARKER"]).touch()
    time.sleep(30)

config_path, epoch = Path(sys.argv[1]), int(sys.argv[2])
flat = {}
for key, value in tomllib.loads(config_path.read_text()).items():
    flat.update(value if isinstance(value, dict) else {key: value})
lr = flat.get("unet_lr") or flat["learning_rate"]
score = 1.0 - abs(math.log(lr / 9e-5)) + 0.01 * epoch - 0.001 * flat["network_dim"] / 64
print(f"scoring {config_path} epoch {epoch}")
print(f"{score:.6f}")
