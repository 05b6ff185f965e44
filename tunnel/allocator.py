"""Process memory settings of the edge and the agent (part of the runtime
shell, like `eventloop.py`): pin glibc's mmap threshold so that RSS stays flat
under sustained TLS traffic, and hand freed heap pages back to the system.

Why: every TLS read on asyncio and on uvloop asks OpenSSL for up to 256 KiB
(`SSLObject.read(256 KiB)`), then shrinks the bytes object to what arrived.
glibc starts by serving blocks of 128 KiB and more with mmap. But the first
time such a block is freed, it raises its mmap threshold to that size (its
"dynamic" threshold). From then on the 256 KiB buffers come from the brk heap,
and what stays live between them fragments it. Measured (docs/benchmarks.md):
the edge's RSS grew about 75 bytes per request and +11% in a 30-minute soak.
Setting the threshold explicitly turns the adjustment off: large temporary
blocks are mmapped and returned whole when freed, and the edge's RSS stays flat.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
DEFAULT_THRESHOLD = 128 * 1024  # glibc's own starting value
ENV = "MALLOC_MMAP_THRESHOLD_"  # glibc's variable: when set, the user has chosen


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def pin_mmap_threshold(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes, which also disables
    its dynamic growth. Returns False where nothing was changed: not glibc
    (musl, macOS, Windows), or the user set MALLOC_MMAP_THRESHOLD_ already."""
    if os.environ.get(ENV):
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if not ok:
        log.warning("could not set the malloc mmap threshold; RSS may grow under long TLS traffic")
    return ok


def heap_trimmer() -> Callable[[], None] | None:
    """glibc's `malloc_trim(0)` (None elsewhere). It returns to the system the
    free pages anywhere in the heap, not only at its top. What it frees comes
    from fragmentation: after thousands of tunnels have come and gone, small
    allocations that lived across their lifetimes keep the heap's free space
    in scattered pieces that the heap alone never gives back."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return None
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int

    def run() -> None:
        trim(0)

    return run
