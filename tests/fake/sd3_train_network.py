"""A stand-in for sd-scripts' sd3_train_network.py, for testing the kohya backend on SD3 without a GPU.

It reads --config_file as sd-scripts does (sections flattened) and refuses, with exit code 2, what the
real script's parser would not take or its loader could not use: a key that is neither a train_network.py
nor an SD3 argument name (``training/kohya_args.txt`` and ``training/kohya_sd3_args.txt``), a
network_module other than ``networks.lora_sd3``, and a model that is not a single .safetensors file with
SD3 (``model.diffusion_model.joint_blocks.``) tensors. Everything else is tests/fake/train_network.py,
run as it is.
"""

import argparse
import json
import runpy
import struct
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAINING = HERE.parents[1] / "training"


def refuse(message: str) -> None:
    print(f"sd3_train_network.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def safetensors_keys(path: Path) -> list:
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return list(json.loads(fh.read(length)))


parser = argparse.ArgumentParser()
parser.add_argument("--config_file", required=True)
args, _ = parser.parse_known_args()
flat = {}
for key, value in tomllib.loads(Path(args.config_file).read_text()).items():
    flat.update(value if isinstance(value, dict) else {key: value})
known = set((TRAINING / "kohya_args.txt").read_text().split()) | set((TRAINING / "kohya_sd3_args.txt").read_text().split())
unknown = sorted(set(flat) - known)
if unknown:
    refuse(f"unrecognized arguments in {args.config_file}: {', '.join(unknown)}")
if flat.get("network_module") != "networks.lora_sd3":
    refuse(f"network_module {flat.get('network_module')!r}: this script only supports networks.lora_sd3")
model = Path(flat.get("pretrained_model_name_or_path", ""))
if model.suffix != ".safetensors" or not model.is_file():
    refuse(f"pretrained_model_name_or_path {model}: give an SD3 .safetensors file")
if not any(key.startswith("model.diffusion_model.joint_blocks.") for key in safetensors_keys(model)):
    refuse(f"{model} has no SD3 MMDiT weights (model.diffusion_model.joint_blocks.*)")
runpy.run_path(str(HERE / "train_network.py"), run_name="__main__")
