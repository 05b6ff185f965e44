"""Which asyncio event loop runs the edge and the agent (part of the process
runtime): uvloop when it is installed, else the standard one.
uvloop's gain here is memory: asyncio keeps a 256 KiB TLS read buffer per
connection, so 1,000 idle tunnels cost the edge 346 MB on asyncio and 101 MB
on uvloop; speed was the same within noise (docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

from .cli import StartupError

T = TypeVar("T")
CHOICES = ("auto", "uvloop", "asyncio")


def run(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    if loop == "uvloop" or (loop == "auto" and importlib.util.find_spec("uvloop") is not None):
        try:
            import uvloop
        except ImportError:
            raise StartupError("--loop uvloop needs the uvloop package; pip install uvloop, "
                             "or use --loop asyncio") from None
        return uvloop.run(main)
    return asyncio.run(main)
