"""Trainer backends: ``builtin`` (lora-search's own trainer) and ``kohya`` (a user's sd-scripts)."""

from __future__ import annotations

from search.backends.base import EpochCallback, TrainerBackend
from search.settings import StudySettings

__all__ = ["EpochCallback", "TrainerBackend", "make_backend"]


def make_backend(settings: StudySettings) -> TrainerBackend:
    if settings.backend.type == "kohya":
        from search.backends.kohya import KohyaBackend

        return KohyaBackend(settings.backend.command, settings.backend.poll_seconds)
    from search.backends.builtin import BuiltinBackend

    return BuiltinBackend()
