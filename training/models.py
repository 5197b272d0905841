"""Load Stable Diffusion 1.x / SDXL offline from a diffusers folder or a single checkpoint file.

A single ``.safetensors``/``.ckpt`` file holds weights only; diffusers' ``from_single_file`` needs the
component configs beside it. We never ask the hub for them: :func:`single_file_config_dir` writes the
published SD 1.5 / SDXL base configs into a local folder (the CLIP tokenizer files are rebuilt from the
BPE vocabulary open_clip ships, which is the same vocabulary) and passes that folder as ``config=``.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from training.config import TrainingConfig
from training.errors import LoraSearchError
from training.devices import to_device

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
# A key present only in SDXL base checkpoints (the second, OpenCLIP bigG text encoder).
_SDXL_KEY = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
_SD_UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
_SD2_KEY = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"


class ModelLoadError(LoraSearchError):
    """The base model (or VAE) path is missing, unreadable or not a Stable Diffusion checkpoint."""


@dataclass
class SDModels:
    """The parts of a Stable Diffusion model the trainer uses."""

    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    scheduler_config: dict  # the pipeline's sampling scheduler config
    is_sdxl: bool
    source: str

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def base_model_version(self) -> str:
        """The ``ss_base_model_version`` kohya writes for this model."""
        return "sdxl_base_v1-0" if self.is_sdxl else "sd_v1"


def load_models(cfg: TrainingConfig, dtype: torch.dtype = torch.float32) -> SDModels:
    """Load the UNet, VAE, text encoder(s) and tokenizer(s) named by ``cfg``, offline."""
    source = cfg.pretrained_model_name_or_path
    if not source:
        raise ModelLoadError("pretrained_model_name_or_path is not set; point it at a .safetensors file or a diffusers folder")
    path = Path(source).expanduser()
    if path.is_dir():
        pipe = _load_folder(path, dtype)
    elif path.is_file():
        pipe = _load_single_file(path, dtype)
    else:
        raise ModelLoadError(f"pretrained_model_name_or_path {source}: no such file or folder; check the path")
    models = _from_pipeline(pipe, source)
    if cfg.vae:
        models.vae = load_vae(cfg.vae, models.is_sdxl, dtype)
    return models


def _from_pipeline(pipe: Any, source: str) -> SDModels:
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
    for tokenizer, encoder in zip(tokenizers, encoders):
        _fit_tokenizer_length(tokenizer, encoder)
    return SDModels(
        unet=pipe.unet, vae=pipe.vae, text_encoders=encoders, tokenizers=tokenizers,
        scheduler_config=dict(pipe.scheduler.config), is_sdxl=len(encoders) == 2, source=source,
    )


def _fit_tokenizer_length(tokenizer: Any, encoder: Any) -> None:
    """A tokenizer config without ``model_max_length`` reads as a huge sentinel in transformers, which
    overflows the tokenizer's padding; the text encoder's position count (77 for CLIP) is the real window."""
    positions = encoder.config.max_position_embeddings
    if tokenizer.model_max_length > positions:
        tokenizer.model_max_length = positions


def _load_folder(path: Path, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path} has no model_index.json; give a diffusers model folder or a .safetensors file")
    class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    is_xl = "XL" in class_name or (path / "text_encoder_2").is_dir()
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    kwargs = {} if is_xl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        return cls.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(f"{path}: cannot load the diffusers model ({_first_line(exc)}); check the folder") from None


def detect_checkpoint_kind(path: Path) -> str:
    """``"sd1"``, ``"sd2"`` or ``"sdxl"`` from the tensor names of a single checkpoint file."""
    shapes = _checkpoint_shapes(path, (_SDXL_KEY, _SD_UNET_KEY, _SD2_KEY))
    if _SDXL_KEY in shapes:
        return "sdxl"
    if _SD_UNET_KEY not in shapes:
        raise ModelLoadError(f"{path} is not a Stable Diffusion 1.x/SDXL checkpoint (no UNet weights found); check the file")
    if _SD2_KEY in shapes and shapes[_SD2_KEY][-1] == 1024:
        return "sd2"
    return "sd1"


def checkpoint_family(path: Path) -> str:
    """The model family of a single checkpoint file from its tensor names: ``"sd3"`` or ``"zimage"`` for a
    DiT ``.safetensors`` file (the markers of :mod:`training.vram`: sd-scripts reads SD3 files whose keys start
    ``model.diffusion_model.joint_blocks.``), else :func:`detect_checkpoint_kind`'s ``"sd1"``, ``"sd2"`` or
    ``"sdxl"``. A damaged file raises :class:`ModelLoadError`."""
    from training.vram import DIT_MARKERS

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                keys = list(fh.keys())
        except Exception as exc:  # corrupt headers surface as many exception types
            raise ModelLoadError(f"{path}: cannot read the checkpoint ({_first_line(exc)}); check the file is complete") from None
        for family, markers in DIT_MARKERS.items():
            if any(key.startswith(markers) for key in keys):
                return family
    return detect_checkpoint_kind(path)


def _checkpoint_shapes(path: Path, wanted: tuple[str, ...]) -> dict[str, tuple]:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                keys = set(fh.keys())
                return {k: tuple(fh.get_slice(k).get_shape()) for k in wanted if k in keys}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = state.get("state_dict", state)
        return {k: tuple(state[k].shape) for k in wanted if k in state}
    except Exception as exc:  # corrupt headers surface as many exception types
        raise ModelLoadError(f"{path}: cannot read the checkpoint ({_first_line(exc)}); check the file is complete") from None


def _load_single_file(path: Path, dtype: torch.dtype, config_dir: Optional[Path] = None) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"{path}: unrecognized model file type; give a .safetensors/.ckpt file or a diffusers folder")
    kind = detect_checkpoint_kind(path)
    if kind == "sd2":
        raise ModelLoadError(f"{path} is a Stable Diffusion 2.x file; convert it to a diffusers folder and point at that")
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    config_dir = config_dir or single_file_config_dir(kind)
    kwargs = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    try:
        return cls.from_single_file(str(path), config=str(config_dir), local_files_only=True, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: cannot load the checkpoint ({_first_line(exc)}); check the file") from None


def load_vae(source: str, is_sdxl: bool, dtype: torch.dtype = torch.float32) -> Any:
    """A VAE from a diffusers folder (with or without a ``vae/`` subfolder) or a single file."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    try:
        if path.is_dir():
            sub = "vae" if (path / "vae" / "config.json").is_file() else None
            return AutoencoderKL.from_pretrained(path, subfolder=sub, dtype=dtype, local_files_only=True)
        if path.is_file():
            config = single_file_config_dir("sdxl" if is_sdxl else "sd1")
            return AutoencoderKL.from_single_file(str(path), config=str(config), subfolder="vae",
                                                  dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"vae {source}: cannot load it ({_first_line(exc)}); give a VAE file or folder") from None
    raise ModelLoadError(f"vae {source}: no such file or folder; check the path")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- offline configs for single-file loading ---------------------------------------------------------

def _clip_text_config(hidden: int, layers: int, heads: int, act: str, with_projection: bool) -> dict:
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": hidden,
        "intermediate_size": hidden * 4, "num_hidden_layers": layers, "num_attention_heads": heads,
        "max_position_embeddings": 77, "hidden_act": act, "projection_dim": 768 if hidden == 768 else hidden,
        "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }


def _vae_config(scaling: float) -> dict:
    return {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "sample_size": 512, "scaling_factor": scaling, "act_fn": "silu",
    }


_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}

_SD1_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8,
    "cross_attention_dim": 768, "norm_num_groups": 32,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}

_SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048, "norm_num_groups": 32, "use_linear_projection": True,
    "transformer_layers_per_block": [1, 2, 10], "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


def _pipeline_layout(kind: str) -> dict[str, dict]:
    if kind == "sdxl":
        return {
            "model_index.json": {
                "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            },
            "unet/config.json": _SDXL_UNET, "vae/config.json": {**_vae_config(0.13025), "force_upcast": True},
            "text_encoder/config.json": _clip_text_config(768, 12, 12, "quick_gelu", False),
            "text_encoder_2/config.json": _clip_text_config(1280, 32, 20, "gelu", True),
            "scheduler/scheduler_config.json": {"_class_name": "EulerDiscreteScheduler", **_SCHEDULER},
        }
    return {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
            "safety_checker": [None, None], "feature_extractor": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "unet/config.json": _SD1_UNET, "vae/config.json": _vae_config(0.18215),
        "text_encoder/config.json": _clip_text_config(768, 12, 12, "quick_gelu", False),
        "scheduler/scheduler_config.json": {"_class_name": "PNDMScheduler", "skip_prk_steps": True, **_SCHEDULER},
    }


_CONFIG_DIRS: dict[str, Path] = {}


def single_file_config_dir(kind: str) -> Path:
    """A local diffusers-layout folder of configs (no weights) for ``kind`` ``"sd1"`` or ``"sdxl"``."""
    if kind in _CONFIG_DIRS and (_CONFIG_DIRS[kind] / "model_index.json").is_file():
        return _CONFIG_DIRS[kind]
    root = Path(tempfile.mkdtemp(prefix=f"lora-search-{kind}-config-"))
    for rel, data in _pipeline_layout(kind).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(data, indent=1), encoding="utf-8")
    write_clip_tokenizer(root / "tokenizer", pad_token="<|endoftext|>")
    if kind == "sdxl":
        write_clip_tokenizer(root / "tokenizer_2", pad_token="!")
    _CONFIG_DIRS[kind] = root
    return root


def byte_unicode_chars() -> list[str]:
    """CLIP's byte-to-character table, in CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def write_clip_tokenizer(folder: Path, pad_token: str) -> Path:
    """Write the CLIP ViT-L/14 tokenizer files, rebuilt from open_clip's shipped BPE merges."""
    import open_clip

    bpe = Path(open_clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = byte_unicode_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "pad_token": pad_token, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": pad_token}), encoding="utf-8")
    return folder


# --- caption conditioning ------------------------------------------------------------------------------


def _tokenize(tokenizer: Any, captions: list[str], device: torch.device, max_token_length: Optional[int]) -> torch.Tensor:
    """Token ids (B, n, 77): one row of 77 for 75 tokens, or ``n`` chunks of 75 as sd-scripts splits longer captions."""
    window = tokenizer.model_max_length
    length = (max_token_length or window - 2) + 2
    ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    if length == window:
        return to_device(ids[:, None], device)
    chunks = []
    for i in range(1, length - window + 2, window - 2):
        chunk = torch.cat([ids[:, :1], ids[:, i:i + window - 2], ids[:, -1:]], dim=1)
        if tokenizer.pad_token_id != tokenizer.eos_token_id:
            # A padded chunk must still end in <EOS>; an empty one reads <BOS> <EOS> <PAD> ...
            full = (chunk[:, -2] != tokenizer.eos_token_id) & (chunk[:, -2] != tokenizer.pad_token_id)
            chunk[full, -1] = tokenizer.eos_token_id
            chunk[chunk[:, 1] == tokenizer.pad_token_id, 1] = tokenizer.eos_token_id
        chunks.append(chunk)
    return to_device(torch.stack(chunks, dim=1), device)


def _join_chunks(hidden: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*n, 77, D) chunk states -> (B, 2 + 75n, D): the first <BOS>, each chunk's 75, the last <EOS>."""
    hidden = hidden.reshape(batch, -1, hidden.shape[-1])
    if hidden.shape[1] == 77:
        return hidden
    parts = [hidden[:, :1]] + [hidden[:, i:i + 75] for i in range(1, hidden.shape[1], 77)] + [hidden[:, -1:]]
    return torch.cat(parts, dim=1)


def encode_captions(models: SDModels, captions: list[str], device: torch.device, clip_skip: Optional[int] = None,
                    batch: Any = None, max_token_length: Optional[int] = None,
                    encode: Optional[Callable[[list], tuple]] = None) -> tuple[torch.Tensor, Optional[dict]]:
    """UNet conditioning for ``captions``: hidden states, plus SDXL's pooled text embedding and size ids.

    ``encode`` stands in for :func:`encode_tokens` with these models and ``clip_skip`` (the trainer passes
    its compiled version).
    """
    ids = tokenize_captions(models, captions, device, max_token_length)
    hidden, pooled = encode(ids) if encode is not None else encode_tokens(models, ids, clip_skip)
    if pooled is None:
        return hidden, None
    return hidden, {"text_embeds": pooled, "time_ids": sdxl_time_ids(batch, len(captions), models, device)}


def tokenize_captions(models: SDModels, captions: list[str], device: torch.device,
                      max_token_length: Optional[int] = None) -> list[torch.Tensor]:
    """Token ids of ``captions`` for each text encoder, each (B, n, 77): n chunks of 75 tokens."""
    return [_tokenize(tokenizer, captions, device, max_token_length) for tokenizer in models.tokenizers]


def encode_tokens(models: SDModels, ids: list[torch.Tensor],
                  clip_skip: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The text encoders' hidden states (B, 2 + 75n, D) for :func:`tokenize_captions`' ids, and SDXL's
    pooled embedding (None for SD 1.x/2.x). No Python work depends on the values, so it compiles whole."""
    n = ids[0].shape[0]
    if not models.is_sdxl:
        te, flat = models.text_encoders[0], ids[0].flatten(0, 1)
        if not clip_skip or clip_skip <= 1:
            return _join_chunks(te(flat)[0], n), None
        hidden = te(flat, output_hidden_states=True).hidden_states[-clip_skip]
        return _join_chunks(te.final_layer_norm(hidden), n), None
    te1, te2 = models.text_encoders
    h1 = te1(ids[0].flatten(0, 1), output_hidden_states=True).hidden_states[-2]
    out2 = te2(ids[1].flatten(0, 1), output_hidden_states=True)
    hidden = torch.cat([_join_chunks(h1, n), _join_chunks(out2.hidden_states[-2], n)], dim=-1)
    pooled = out2.text_embeds.reshape(n, ids[1].shape[1], -1)[:, 0]  # the first chunk's pooled output
    return hidden, pooled


def sdxl_time_ids(batch: Any, n: int, models: SDModels, device: torch.device) -> torch.Tensor:
    """SDXL's size conditioning per example: original size, crop corner, target size (H, W order)."""
    if batch is None:  # no image sizes: a square image at the model's native size, uncropped
        size = models.unet.config.sample_size * models.vae_scale_factor
        rows = [(size, size, 0, 0, size, size)] * n
    else:
        rows = [(*o, *c, *t) for o, c, t in zip(batch.original_hw, batch.crop_top_left, batch.target_hw)]
    return to_device(torch.tensor(rows, dtype=torch.float32), device)
