"""Builders for study tests: a project folder with configs, the fake sd-scripts and the fake scorer."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Callable

import tomli_w

from search.scoring import CheckpointScorer, EpochScore

REPO = Path(__file__).resolve().parents[1]
FAKE = Path(__file__).resolve().parent / "fake"
TOY_MODEL = REPO / "toyworld" / "assets" / "model"
TOY_TRAIN = REPO / "toyworld" / "assets" / "data" / "train"


def make_project(root: Path, n_trials: int = 4, storage: str = "", name: str = "t", epochs_choices=(2, 4),
                 save_every: int = 1, pruner: str = "none", save_state: bool = True) -> Path:
    """A folder holding configs/ like the repo's, set up for the kohya backend with fake scripts.

    Returns the study.toml path. The search space is the default one with epochs shrunk to
    ``epochs_choices`` (the budget semantics do not depend on epoch counts).
    """
    configs = root / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    base = tomllib.loads((REPO / "configs" / "base.toml").read_text())
    base["saving"]["save_every_n_epochs"] = save_every
    # real files for the pre-flight check (the fake sd-scripts never reads them)
    base["model"]["pretrained_model_name_or_path"] = str(TOY_MODEL)
    base["dataset"]["train_data_dir"] = str(TOY_TRAIN)
    base["saving"]["sample_prompts"] = str(REPO / "prompts" / "character.txt")
    base["saving"]["save_state"] = save_state
    (configs / "base.toml").write_text(tomli_w.dumps(base))
    space = tomllib.loads((REPO / "configs" / "search_space.toml").read_text())
    space["max_train_epochs"] = {"choices": list(epochs_choices)}
    (configs / "search_space.toml").write_text(tomli_w.dumps(space))
    study = {
        "study": {"name": name, "storage": storage, "n_trials": n_trials, "seed": 7,
                  "runs_dir": str(root / "runs"), "base_config": str(configs / "base.toml"),
                  "search_space": str(configs / "search_space.toml"), "heartbeat_interval": 2, "grace_period": 6},
        "pruner": {"type": pruner},
        "backend": {"type": "kohya", "poll_seconds": 0.05,
                    "command": [sys.executable, str(FAKE / "train_network.py"), "--config_file", "{config}"]},
        "scorer": {"type": "command", "command": [sys.executable, str(FAKE / "score.py"), "{config}", "{epoch}"]},
    }
    path = configs / "study.toml"
    path.write_text(tomli_w.dumps(study))
    return path


# Keys of a UNet base config that a DiT (SD3/Z-Image) run refuses, and the searched ones among them.
UNET_ONLY_BASE_KEYS = ("min_snr_gamma", "noise_offset", "text_encoder_lr", "clip_skip")


def write_fake_sd3_checkpoint(path: Path, parts: bool = True) -> Path:
    """A few-tensor .safetensors named as an SD3 single file that sd-scripts reads
    (``model.diffusion_model.joint_blocks.*``), with a tensor of each text encoder and the VAE under the names
    sd-scripts looks for (``parts``) or without them; enough for the pre-flight check and the fake sd-scripts."""
    import numpy as np
    from safetensors.numpy import save_file

    block = "model.diffusion_model.joint_blocks.0"
    tensors = {f"{block}.x_block.attn.qkv.weight": np.zeros((24, 8), np.float16),
               f"{block}.context_block.attn.qkv.weight": np.zeros((24, 8), np.float16),
               "model.diffusion_model.x_embedder.proj.weight": np.zeros((8, 16, 2, 2), np.float16)}
    if parts:
        embeddings = "transformer.text_model.embeddings.position_embedding.weight"
        tensors.update({f"text_encoders.clip_l.{embeddings}": np.zeros((77, 4), np.float16),
                        f"text_encoders.clip_g.{embeddings}": np.zeros((77, 4), np.float16),
                        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.weight":
                            np.zeros((4, 4), np.float16),
                        "first_stage_model.decoder.conv_in.weight": np.zeros((4, 16, 3, 3), np.float16)})
    save_file(tensors, str(path))
    return path


def make_dit_project(root: Path, model: Path, backend: str = "builtin", script: str = "sd3_train_network.py",
                     n_trials: int = 1, **base_values) -> Path:
    """:func:`make_project` for an SD3/Z-Image model: the base config and the space without the UNet-only
    keys, ``network_train_unet_only = true``, then ``base_values``. ``backend`` "builtin", or "kohya" running
    the fake sd-scripts ``script``. Returns the study.toml path."""
    study_path = make_project(root, n_trials=n_trials)
    configs = root / "configs"
    base = tomllib.loads((configs / "base.toml").read_text())
    for section in base.values():
        for key in UNET_ONLY_BASE_KEYS:
            section.pop(key, None)
    base["model"]["pretrained_model_name_or_path"] = str(model)
    base["training"]["network_train_unet_only"] = True
    for key, value in base_values.items():
        section = next((sec for sec in base.values() if key in sec), base["training"])
        section[key] = value
    (configs / "base.toml").write_text(tomli_w.dumps(base))
    space = tomllib.loads((configs / "search_space.toml").read_text())
    for key in UNET_ONLY_BASE_KEYS:
        space.pop(key, None)
    (configs / "search_space.toml").write_text(tomli_w.dumps(space))
    study = tomllib.loads(study_path.read_text())
    if backend == "builtin":
        study["backend"] = {"type": "builtin"}
    else:
        study["backend"]["command"][1] = str(FAKE / script)
    study_path.write_text(tomli_w.dumps(study))
    return study_path


class SheetScorer(CheckpointScorer):
    """A scorer (the fake command scorer) that also reports a contact sheet per epoch, as the CLIP scorer
    does, and ``components(epoch)`` when given (else the inner scorer's components)."""

    def __init__(self, inner: CheckpointScorer, components: Callable[[int], dict[str, float]] | None = None):
        self.inner, self.components = inner, components

    def score(self, run_dir, config_path, epoch, checkpoint) -> EpochScore:
        from PIL import Image

        result = self.inner.score(run_dir, config_path, epoch, checkpoint)
        sheet = run_dir / f"contact_sheet_e{epoch}.png"
        Image.new("RGB", (8, 8), (0, 0, 50 * epoch % 256)).save(sheet)
        components = result.components if self.components is None else self.components(epoch)
        return EpochScore(epoch, result.total, components, [sheet])
