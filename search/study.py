"""Study set-up: storage from a URL, the sampler, the quality pruner, create or load.

Storage URLs:

- empty: SQLite at ``<runs_dir>/<study>/study.db`` - one worker, nothing to set up;
- ``journal:PATH`` (or a path ending in ``.log``/``.journal``): Optuna's JournalStorage file - several
  worker processes on one machine;
- ``sqlite:///PATH``, ``postgresql://USER:PASS@HOST/DB``, ``mysql://...``: any SQLAlchemy URL Optuna's
  RDBStorage accepts; PostgreSQL is the tested engine for workers on several machines.

RDB storages get heartbeats (``heartbeat_interval``/``grace_period`` from study.toml), so a worker that
dies leaves a trial that :func:`optuna.storages.fail_stale_trials` fails; Optuna's
``RetryHeartbeatStaleTrialCallback`` then queues a copy (params, user attrs, reported epochs) that the
next worker continues from the dead run's last saved training state.
"""

from __future__ import annotations

import errno
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from search.errors import StorageError, StudyError
from search.settings import StudySettings

# Heartbeats and TPE's group option are marked experimental; lora-search relies on both on purpose.
# Workers use ask/tell and record heartbeats themselves (search.worker.heartbeat), which Optuna's
# "supposed to be used with Study.optimize" warning does not know.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

_RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")


def retry_callback(max_retry: int) -> RetryHeartbeatStaleTrialCallback:
    """How a trial whose worker stopped is queued again: same params and user attrs, and the epochs
    it already reported, so the retry continues the run instead of starting over."""
    return RetryHeartbeatStaleTrialCallback(max_retry, inherit_intermediate_values=True)


def storage_url(settings: StudySettings) -> str:
    """The study's storage URL, with the default SQLite file made absolute."""
    if settings.study.storage:
        return settings.study.storage
    return f"sqlite:///{(settings.study_dir / 'study.db').resolve()}"


def redact(url: str) -> str:
    """The URL with any password replaced, for messages."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _journal_path(url: str) -> Optional[Path]:
    if url.startswith("journal:"):
        return Path(url[len("journal:"):])
    if "://" not in url and url.endswith((".log", ".journal")):
        return Path(url)
    return None


def storage_file(url: str) -> Optional[Path]:
    """The local file a SQLite or journal URL names, else None."""
    journal = _journal_path(url)
    if journal is not None:
        return journal
    if url.startswith("sqlite:///") and url[len("sqlite:///"):] not in ("", ":memory:"):
        return Path(url[len("sqlite:///"):])
    return None


def _first_missing(path: Path) -> Optional[Path]:
    """The outermost of ``path`` and its folders that does not exist yet (what opening it creates)."""
    missing = None
    for candidate in [path, *path.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


def _file_error(path: Path, exc: BaseException) -> StorageError:
    text = str(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC or "disk is full" in text or "No space left" in text:
        return StorageError(f"no space left on the disk of {path}; free some space, or put the study elsewhere "
                            "with [study] runs_dir or --storage")
    reason = getattr(exc, "strerror", None) or (text.strip().splitlines() or [type(exc).__name__])[0]
    return StorageError(f"cannot write {path} ({reason}); make its folder writable, or put the study elsewhere "
                        "with [study] runs_dir or --storage")


def open_storage(url: str, settings: Optional[StudySettings] = None) -> BaseStorage:
    """Open (creating if needed) the storage behind ``url``; one clear error when it cannot be, and then
    no file or folder it would have created is left behind."""
    path = storage_file(url)
    created = _first_missing(path.resolve()) if path is not None else None
    try:
        return _open_storage(url, settings, path)
    except BaseException as exc:
        if created is not None and created.exists():
            shutil.rmtree(created) if created.is_dir() else created.unlink()
        if path is not None and (isinstance(exc, OSError) or _is_file_problem(str(exc))):
            raise _file_error(path, exc) from None
        raise


def _is_file_problem(text: str) -> bool:
    return any(s in text for s in ("disk is full", "unable to open database file", "readonly database",
                                   "No space left", "Permission denied", "Read-only file system"))


def _open_storage(url: str, settings: Optional[StudySettings], path: Optional[Path]) -> BaseStorage:
    journal = _journal_path(url)
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(journal)))
    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in _RDB_SCHEMES:
        raise StorageError(
            f"storage URL '{redact(url)}' is not understood; use sqlite:///PATH, "
            "postgresql://USER:PASSWORD@HOST/DB or journal:PATH")
    if scheme == "sqlite":
        Path(url.split(":///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
    heartbeat = settings.study.heartbeat_interval if settings else 60
    grace = settings.study.grace_period if settings else 300
    retry = retry_callback(settings.study.max_retry if settings else 3)
    engine_kwargs = {"connect_args": {"timeout": 30}} if scheme == "sqlite" else {"pool_pre_ping": True}
    try:
        return _rdb_with_retry(url, engine_kwargs, heartbeat, grace, retry)
    except ModuleNotFoundError as exc:
        raise StorageError(f"storage '{redact(url)}' needs the Python package {exc.name}; "
                           "pip install 'lora-search[postgres]'") from None
    except Exception as exc:  # SQLAlchemy raises many types for a bad URL or an unreachable server
        if "Failed to import DB access module" in str(exc):
            raise StorageError(f"storage '{redact(url)}' needs a database driver; "
                               "pip install 'lora-search[postgres]' (psycopg) or the MySQL driver") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open storage '{redact(url)}': {first}; check the URL and that the "
                           "database server is running") from exc


def _rdb_with_retry(url: str, engine_kwargs: dict, heartbeat: int, grace: int,
                    retry: RetryHeartbeatStaleTrialCallback, attempts: int = 4) -> RDBStorage:
    """Open an RDB storage; workers started together may race to create the schema, so a failure
    is retried a few times before it counts."""
    for attempt in range(attempts):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat, grace_period=grace,
                              heartbeat_stale_trial_callback=retry)
        except ModuleNotFoundError:
            raise
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


class GPAfterRejections(optuna.samplers.GPSampler):
    """Optuna's GPSampler, made to survive the constraints.

    GPSampler learns only from COMPLETE trials, so a point the constraints reject (PRUNED before
    training) teaches it nothing: it proposes the same point again, for ever (measured: 500 rejections
    in a row on the default space). The draw after a rejection is therefore random; the GP's next
    proposal comes after the next trained trial.
    """

    def sample_relative(self, study, trial, search_space):
        finished = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and t.state.is_finished()]
        if finished and finished[-1].user_attrs.get("prune_reason") in ("constraint", "vram"):
            return {}  # every parameter then comes from the independent (random) sampler
        return super().sample_relative(study, trial, search_space)


def make_sampler(settings: StudySettings, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The sampler study.toml names; ``seed_offset`` separates the random streams of parallel workers."""
    s = settings.sampler
    seed = settings.study.seed + seed_offset
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.type == "gp":
        return GPAfterRejections(seed=seed, n_startup_trials=s.n_startup_trials, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(
        n_startup_trials=s.n_startup_trials,
        multivariate=s.multivariate,
        group=s.group,
        constant_liar=s.constant_liar,
        seed=seed,
    )


def make_pruner(settings: StudySettings) -> optuna.pruners.BasePruner:
    """The quality pruner study.toml names (``median`` compares raw epoch numbers; ``schedule_median``
    compares equal fractions of each trial's own schedule, see search.pruners)."""
    p = settings.pruner
    if p.type == "none":
        return optuna.pruners.NopPruner()
    if p.type == "schedule_median":
        from search.pruners import ScheduleMedianPruner

        return ScheduleMedianPruner(n_startup_trials=p.n_startup_trials, min_fraction=p.min_fraction)
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor)
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource,
                                                      reduction_factor=p.reduction_factor)
    return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps,
                                       interval_steps=p.interval_steps)


def open_study(settings: StudySettings, create: bool = True, seed_offset: int = 0) -> optuna.Study:
    """Create the study or continue it; with ``create=False`` a missing study is an error and nothing
    is created (no folder, no database file).

    What ``start`` was given and the study remembers (:func:`remember_launch`) is applied to
    ``settings``: its ``--n-trials`` budget, unless this command line sets one.
    """
    url = storage_url(settings)
    name = settings.study.name
    if not create and not storage_exists(url):
        raise _no_study(name, url)
    storage = open_storage(url, settings)
    kwargs = dict(study_name=name, storage=storage, sampler=make_sampler(settings, seed_offset),
                  pruner=make_pruner(settings))
    if create:
        study = optuna.create_study(direction=settings.study.direction, load_if_exists=True, **kwargs)
    else:
        try:
            study = optuna.load_study(**kwargs)
        except KeyError:
            raise _no_study(name, url) from None
    budget = launch_settings(study).get("n_trials")
    if budget and not settings.budget_given:
        settings.study.n_trials = int(budget)
    return study


def _no_study(name: str, url: str) -> StudyError:
    return StudyError(f"no study named '{name}' in {redact(url)}; start it with lora-search start "
                      "(or pass --study/--storage of an existing one)")


def storage_exists(url: str) -> bool:
    """False when ``url`` names a SQLite or journal file that does not exist (so it holds no study);
    True otherwise (a database server is asked by opening it)."""
    journal = _journal_path(url)
    if journal is not None:
        return journal.is_file()
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        return path in ("", ":memory:") or Path(path).is_file()
    return True


LAUNCH_ATTR = "launch"


def launch_settings(study: optuna.Study) -> dict:
    """What the last ``lora-search start`` was given: ``{"gpus": [...], "n_trials": N}`` (either may be absent)."""
    return dict(study.user_attrs.get(LAUNCH_ATTR) or {})


def remember_launch(study: optuna.Study, gpus: list[int], settings: StudySettings) -> None:
    """Keep the GPUs (and a --n-trials budget) ``start`` was given, so ``resume`` brings all of it back."""
    launch = launch_settings(study) | {"gpus": list(gpus)}
    if settings.budget_given:
        launch["n_trials"] = settings.study.n_trials
    study.set_user_attr(LAUNCH_ATTR, launch)
