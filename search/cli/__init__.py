"""``lora-search``: one module per subcommand in this package, each with ``register(subparsers)``.

``main(argv)`` is callable from tests and returns the exit code. Errors a user can cause are
:class:`LoraSearchError`; they print one line (``--debug`` shows the traceback) and exit 2 unless the
error carries its own ``exit_code``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback
from typing import Optional, Sequence

from training.errors import LoraSearchError

DEBUG_HELP = "show the traceback of an error"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-search",
        description="Optuna TPE search over kohya-style LoRA hyperparameters for Stable Diffusion.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(subparsers)
    for subparser in subparsers.choices.values():
        # After the subcommand too; SUPPRESS leaves a --debug given before the subcommand in place.
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except LoraSearchError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"lora-search {args.command}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"lora-search {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # lora-search status | head: the reader is gone, which is not an error
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's exit-time flush does not raise a second BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
