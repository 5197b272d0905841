"""Sample prompt files in kohya's syntax, and trigger-word handling.

One prompt per line: ``prompt --n negative --w 512 --h 512 --d seed --s steps --l cfg [--ss sampler]``.
Blank lines and lines starting with ``#`` are skipped. ``{trigger}`` anywhere in a line is replaced by
the config's ``metadata_trigger_phrase``, so one prompt file serves every character.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from training.errors import ConfigError

TRIGGER_PLACEHOLDER = "{trigger}"


@dataclass
class SamplePrompt:
    """One line of a prompt file; ``index`` is its position among the prompts (0-based)."""

    index: int
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: Optional[int] = None
    steps: int = 30
    scale: float = 7.5
    sampler: Optional[str] = None  # ``--ss``; None means the config's sample_sampler


def _size(value: str) -> int:
    size = int(value)
    if size < 64 or size % 8:
        raise ValueError("use a multiple of 8, at least 64")
    return size


def _steps(value: str) -> int:
    steps = int(value)
    if not 1 <= steps <= 1000:
        raise ValueError("use 1 to 1000 steps")
    return steps


def _scale(value: str) -> float:
    scale = float(value)
    if not scale >= 0:  # also rejects nan
        raise ValueError("use a number >= 0")
    return scale


def _seed(value: str) -> int:
    seed = int(value)
    if seed < 0:
        raise ValueError("use a whole number >= 0")
    return seed


# option -> (SamplePrompt field, parser)
_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "n": ("negative_prompt", str),
    "w": ("width", _size),
    "h": ("height", _size),
    "d": ("seed", _seed),
    "s": ("steps", _steps),
    "l": ("scale", _scale),
    "ss": ("sampler", str),
}


def parse_prompt_line(line: str, index: int, where: str, defaults: Optional[dict[str, Any]] = None) -> SamplePrompt:
    """Parse one prompt line; ``where`` ("file:line") prefixes any error. ``defaults`` (SamplePrompt fields,
    e.g. a model family's ``steps`` and ``scale``) replace the kohya defaults for options the line omits."""
    text, *options = (" " + line).split(" --")  # the leading space lets a line start with an option
    sample = SamplePrompt(index=index, prompt=text.strip(), **(defaults or {}))
    for option in options:
        name, _, value = option.strip().partition(" ")
        key = name.lower()
        if key not in _OPTIONS:
            known = ", ".join("--" + k for k in _OPTIONS)
            raise ConfigError(f"{where}: unknown option --{name}; use {known}")
        field_name, parse = _OPTIONS[key]
        value = value.strip()
        try:
            if not value:
                raise ValueError("give a value")
            setattr(sample, field_name, parse(value))
        except ValueError as exc:
            reason = str(exc)
            if reason.startswith(("invalid literal", "could not convert")):
                reason = "give a number"
            raise ConfigError(f"{where}: --{name} {value!r} is not valid; {reason}") from None
    if not sample.prompt:
        raise ConfigError(f"{where}: the line has options but no prompt; write the prompt before the first --")
    return sample


def load_prompt_file(path: str | Path, trigger: Optional[str],
                     defaults: Optional[dict[str, Any]] = None) -> list[SamplePrompt]:
    """Read a kohya prompt file, replacing ``{trigger}`` with ``trigger`` (``defaults``: see :func:`parse_prompt_line`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sample prompt file {path} not found; check sample_prompts in the config")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"sample prompt file {path} is not UTF-8 text; save it as UTF-8") from None
    prompts: list[SamplePrompt] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        if TRIGGER_PLACEHOLDER in line:
            if not trigger:
                raise ConfigError(f"{where}: the prompt uses {TRIGGER_PLACEHOLDER} but no trigger is given; "
                                  "set metadata_trigger_phrase in the training config")
            line = line.replace(TRIGGER_PLACEHOLDER, trigger)
        prompts.append(parse_prompt_line(line, len(prompts), where, defaults))
    if not prompts:
        raise ConfigError(f"sample prompt file {path} has no prompts; add one prompt per line")
    return prompts


def strip_trigger(prompt: str, trigger: Optional[str]) -> str:
    """``prompt`` without the trigger words (whole words, any case), its commas and spaces tidied.

    A trigger like ``"ohwx, sks"`` removes each comma-separated part. Used where the prompt is compared
    to an image by a model that does not know the made-up trigger token.
    """
    text = prompt.replace(TRIGGER_PLACEHOLDER, "")
    for phrase in (trigger or "").split(","):
        words = phrase.split()
        if words:
            pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
            text = re.sub(pattern, "", text, flags=re.IGNORECASE)
    parts = (" ".join(part.split()) for part in text.split(","))
    return ", ".join(part for part in parts if part)
