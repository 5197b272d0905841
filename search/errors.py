"""Errors of the search side; all derive from the project's one root, :class:`LoraSearchError`."""

from training.errors import ConfigError, LoraSearchError

__all__ = ["ConfigError", "LoraSearchError", "StorageError", "StudyError", "TrainingFailed"]


class StorageError(LoraSearchError):
    """The study storage URL is malformed or the storage cannot be opened."""


class StudyError(LoraSearchError):
    """The study is missing, has no such trial, or has no finished trial to export."""


class TrainingFailed(LoraSearchError):
    """A trial's training or scoring failed; the trial is recorded as FAIL and the worker goes on."""
