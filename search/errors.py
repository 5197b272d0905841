"""Errors of the search side; all derive from the project's one root, :class:`LoraSearchError`."""

from training.errors import ConfigError, LoraSearchError

__all__ = ["ConfigError", "LoraSearchError", "OutOfMemory", "StorageError", "StudyError", "TrainingFailed"]


class StorageError(LoraSearchError):
    """The study storage URL is malformed or the storage cannot be opened."""


class StudyError(LoraSearchError):
    """The study is missing, has no such trial, or has no finished trial to export."""


class TrainingFailed(LoraSearchError):
    """A trial's training or scoring failed; the trial is recorded as FAIL and the worker goes on."""


class OutOfMemory(TrainingFailed):
    """The GPU ran out of memory; the trial is PRUNED (reason ``oom``) so TPE learns to avoid it."""


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or any error whose message says the device ran out of memory."""
    return isinstance(exc, OutOfMemory) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()
