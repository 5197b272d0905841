"""Every log line reaches the terminal once, also after open_clip (which logs through the root logger)
has loaded CLIP."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from evaluation.clip_loader import load_clip
from evaluation.settings import ClipSettings
from search.cli._common import PACKAGES, setup_logging


@contextlib.contextmanager
def fresh_process_logging() -> Iterator[None]:
    """Logging as a new ``lora-search`` process finds it: no handler anywhere. Entered inside the test,
    since pytest puts its own handlers on the root logger for the test's run (and those would keep
    ``logging.info`` from installing a second one)."""
    root = logging.getLogger()
    loggers = [logging.getLogger(name) for name in PACKAGES]
    saved = [(logger, logger.handlers[:], logger.level) for logger in [root, *loggers]]
    for logger in [root, *loggers]:
        logger.handlers.clear()
    try:
        yield
    finally:
        for logger, handlers, level in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)


def test_each_line_is_printed_once_after_clip_is_loaded(tiny_clip_dir, capsys):
    with fresh_process_logging():
        setup_logging()  # what the worker, train and demo commands do first
        log = logging.getLogger("search.worker")
        log.info("trial 0: started")
        load_clip(ClipSettings(model=f"local-dir:{tiny_clip_dir}", pretrained=""))
        log.info("trial 0 epoch 2: score 0.512")
        logging.getLogger("training.trainer").warning("dataset folder 'notes' skipped")
        logging.warning("a library's warning")  # as open_clip logs: through the root logger
        logging.info("a library's progress line")
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == ""
    for message in ("trial 0: started", "trial 0 epoch 2: score 0.512"):
        assert sum(line.endswith(" " + message) for line in lines) == 1, out
    assert sum(line.endswith(" warning: dataset folder 'notes' skipped") for line in lines) == 1, out
    assert sum(line.endswith(" warning: a library's warning") for line in lines) == 1, out
    assert "progress line" not in out  # libraries stay at warnings


def test_setting_up_twice_still_prints_once(capsys):
    with fresh_process_logging():
        setup_logging()
        setup_logging(verbose=False)
        logging.getLogger("evaluation").warning("weights do not sum to 1")
        logging.getLogger("evaluation").info("hidden when not verbose")
    out, err = capsys.readouterr()
    assert out.count("weights do not sum to 1") == 1 and "hidden" not in out and err == ""
