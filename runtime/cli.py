"""The skeleton of every console script: one logging format, and start-up
errors that name the problem and the fix in one line (exit 2), never a
traceback. Code below the CLIs raises `StartupError`; only `main` exits."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")


class StartupError(Exception):
    """The process cannot start; the message says why and what to do, in one line."""


def setup_logging(level: str, quiet: Iterable[str] = ("aiohttp.access",), tag: str = "") -> None:
    """`tag` follows the logger's name on every line, e.g. "[1]" for edge process 1."""
    fmt = LOG_FORMAT.replace("%(name)s", "%(name)s" + tag.replace("%", "%%")) if tag else LOG_FORMAT
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_main(body: Callable[[], int | None]) -> int:
    """Run a console script's body: a StartupError prints `error: ...` and
    exits 2, Ctrl-C exits quietly (130)."""
    try:
        return body() or 0
    except StartupError as exc:
        text = str(exc)
        print(text if text.startswith("error:") else f"error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
