"""Loading an open_clip model from local files only, and encoding images and texts with it.

Three ways to point at a model, all offline:

* a built-in model name plus a local weights file (``pretrained = "models/clip/x.safetensors"``);
* ``local-dir:FOLDER`` holding ``open_clip_config.json`` and ``open_clip_model.safetensors``;
* a built-in name plus a pretrained tag (or ``hf-hub:org/repo``) already in a populated ``cache_dir``.

``HF_HUB_OFFLINE=1`` is set around every open_clip call, so a missing file fails at once with a line
saying what to download and where to put it instead of reaching for the network.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from training.errors import LoraSearchError

from evaluation.settings import ClipSettings

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode for the duration, restoring the previous state afterwards.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import, so the module constant is switched
    too: setting only the environment would not stop an already imported hub client from connecting.
    """
    import huggingface_hub.constants as hub_constants

    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {name: os.environ.get(name) for name in names}
    saved_constant = hub_constants.HF_HUB_OFFLINE
    os.environ.update({name: "1" for name in names})
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_constant
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class ClipModel:
    """A loaded CLIP model with its preprocessing and tokenizer; embeddings come back L2-normalized."""

    model: Any
    preprocess: Callable[[Any], Any]
    tokenizer: Callable[[Sequence[str]], Any]
    device: Any
    batch_size: int = 16
    name: str = ""

    def encode_images(self, images: Sequence[Any]) -> Any:
        """Embed PIL images; returns a float tensor ``(len(images), dim)`` with unit rows, on the CPU."""
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start:start + self.batch_size]])
            with torch.no_grad():
                feats = self.model.encode_image(batch.to(self.device))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        if not out:
            return torch.empty(0, 0)
        return torch.cat(out)

    def encode_texts(self, texts: Sequence[str]) -> Any:
        """Embed prompts; returns a float tensor ``(len(texts), dim)`` with unit rows, on the CPU."""
        import torch

        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size]))
            with torch.no_grad():
                feats = self.model.encode_text(tokens.to(self.device))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        if not out:
            return torch.empty(0, 0)
        return torch.cat(out)


def _resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LoraSearchError(f"[clip] device = {name!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoraSearchError(f"[clip] device = {name!r} but no CUDA GPU is visible; use auto or cpu")
    return device


def _hub_repo_for(model_name: str, tag: str = "") -> str:
    """The Hugging Face repo open_clip knows for ``tag`` of a built-in model (else its first tag with one)."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    for candidate in ([tag] if tag in tags else []) + tags:
        repo = open_clip.get_pretrained_cfg(model_name, candidate).get("hf_hub", "")
        if repo:
            return "/".join(repo.strip("/").split("/")[:2])  # drop a trailing file name
    return ""


def _download_hint(model_name: str, tag: str = "") -> str:
    repo = _hub_repo_for(model_name, tag)
    if repo:
        return f"download open_clip_model.safetensors from https://huggingface.co/{repo}"
    return f"download the {model_name} open_clip weights (.safetensors)"


def _check_local_dir(folder: Path) -> None:
    if not folder.is_dir():
        raise LoraSearchError(
            f"CLIP folder {folder} not found; put open_clip_config.json and open_clip_model.safetensors "
            f"(from the model's Hugging Face repo) there, or fix --clip-model")
    if not (folder / "open_clip_config.json").is_file():
        raise LoraSearchError(
            f"CLIP folder {folder} has no open_clip_config.json; copy it there from the model's "
            f"Hugging Face repo together with open_clip_model.safetensors")
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in folder.iterdir()):
        raise LoraSearchError(
            f"CLIP folder {folder} has no weights file; put open_clip_model.safetensors from the "
            f"model's Hugging Face repo there")


def _check_builtin(settings: ClipSettings) -> None:
    """Fail early, before open_clip, when a built-in name's weights cannot be found locally."""
    import open_clip

    name = settings.model.replace("/", "-")
    if name not in open_clip.list_models():
        near = difflib.get_close_matches(name, open_clip.list_models(), n=1)
        hint = f"did you mean '{near[0]}'?" if near else "use an open_clip model name or local-dir:FOLDER"
        raise LoraSearchError(f"CLIP model '{settings.model}' is not an open_clip model name; {hint}")
    pretrained = settings.pretrained
    if not pretrained:
        raise LoraSearchError(
            f"no CLIP weights set for {name}; {_download_hint(name)} and pass --clip-pretrained FILE")
    if Path(pretrained).is_file():
        return
    if pretrained in open_clip.list_pretrained_tags_by_model(name):
        if not settings.cache_dir:
            raise LoraSearchError(
                f"pretrained tag '{pretrained}' needs a populated cache; set [clip] cache_dir, or "
                f"{_download_hint(name, pretrained)} and pass --clip-pretrained FILE")
        return
    raise LoraSearchError(
        f"CLIP weights file {pretrained} not found; {_download_hint(name)} and save it as {pretrained} "
        f"(or pass --clip-pretrained FILE)")


def _create(settings: ClipSettings) -> tuple[Any, Any, Any]:
    import open_clip

    cache_dir = settings.cache_dir or None
    pretrained = None if settings.model.startswith((LOCAL_DIR, HF_HUB)) else settings.pretrained
    with hub_offline():
        model, _, preprocess = open_clip.create_model_and_transforms(
            settings.model, pretrained=pretrained, force_quick_gelu=settings.force_quick_gelu,
            cache_dir=cache_dir)
        tokenizer = open_clip.get_tokenizer(settings.model, cache_dir=cache_dir)
    return model, preprocess, tokenizer


def load_clip(settings: ClipSettings) -> ClipModel:
    """Load the CLIP model the settings name, from local files only; errors say what to download."""
    _check_before_loading(settings)
    device = _resolve_device(settings.device)
    try:
        model, preprocess, tokenizer = _create(settings)
    except Exception as exc:  # open_clip raises bare RuntimeError/ValueError/OSError for bad files
        raise _load_error(settings, exc) from exc
    model = model.to(device).eval()
    return ClipModel(model=model, preprocess=preprocess, tokenizer=tokenizer, device=device,
                     batch_size=settings.batch_size, name=settings.model)


def _check_before_loading(settings: ClipSettings) -> None:
    model_name = settings.model
    if model_name.startswith(LOCAL_DIR):
        _check_local_dir(Path(model_name[len(LOCAL_DIR):]).expanduser())
    elif model_name.startswith(HF_HUB):
        if not settings.cache_dir:
            raise LoraSearchError(
                f"{model_name} would need the network; {_download_hint_for(model_name)}")
    else:
        _check_builtin(settings)


def _is_cache_miss(exc: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: Optional[BaseException] = exc
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or "Failed to download" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _load_error(settings: ClipSettings, exc: BaseException) -> LoraSearchError:
    name = settings.model
    if settings.cache_dir and _is_cache_miss(exc):
        return LoraSearchError(f"CLIP '{name}' ({settings.pretrained or 'default weights'}) is not in the cache "
                               f"{settings.cache_dir}; {_download_hint_for(name, settings.pretrained)}")
    detail = " ".join(str(exc).split())
    detail = (detail[:150] + "...") if len(detail) > 150 else (detail or type(exc).__name__)
    return LoraSearchError(
        f"could not load CLIP '{name}' ({detail}); check the weights match the model name "
        f"(OpenAI weights need a -quickgelu name), or {_download_hint_for(name)}")


def _download_hint_for(model_name: str, tag: str = "") -> str:
    if model_name.startswith(LOCAL_DIR):
        return "replace the folder's files with the ones from the model's Hugging Face repo"
    if model_name.startswith(HF_HUB):
        repo = model_name[len(HF_HUB):]
        return (f"download open_clip_config.json and open_clip_model.safetensors from "
                f"https://huggingface.co/{repo} into a folder and pass --clip-model local-dir:FOLDER")
    return _download_hint(model_name.replace("/", "-"), tag) + " and pass --clip-pretrained FILE"
