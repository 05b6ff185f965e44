"""What every `loadtest` subcommand shares on its command line: argument
types, the one-line error, writing a report file and the console."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from .client import UsageError


def positive(kind: type) -> Any:
    def parse(value: str) -> Any:
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {value!r}")
        return v
    return parse


def non_negative(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value!r}")
    return v


def err(message: str) -> None:
    print(f"loadtest: {message}", file=sys.stderr, flush=True)


def write(path: str, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


def console() -> Console:
    return Console(highlight=False, soft_wrap=True, width=max(100, Console().width))


def check_writable(*paths: str | None) -> None:
    for path in paths:
        if path:
            parent = Path(path).resolve().parent
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise UsageError(f"cannot write {path}: {parent} is not a writable directory")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each default printed once: appended only when there is one (not
    None, False or empty) and the help text does not already say it; the
    epilog's examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d == [] or d is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {ln}" for ln in lines)
