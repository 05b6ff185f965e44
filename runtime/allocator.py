"""Process memory settings of the edge and the agent (part of the process
runtime, like `eventloop.py`): pin glibc's mmap threshold so that RSS stays flat
under sustained TLS traffic, and hand freed heap pages back to the system.

Why: on their copying read path (aiohttp's), asyncio and uvloop read TLS with
`SSLObject.read(256 KiB)`, which allocates 256 KiB and shrinks the result to
what arrived. glibc serves blocks of 128 KiB and more with mmap at first. But
when it frees an mmapped block above its threshold, it raises the threshold to
that block's size (the "dynamic" threshold). After one such free, the 256 KiB
buffers come from the brk heap, and what stays live between them fragments it.
Measured (docs/benchmarks.md): the edge's RSS grew about 75 bytes per request,
+11% in a 30-minute soak; pinned, +2.8%.

The cost: every 256 KiB read is then an mmap, its page faults and a munmap.
Small requests show no difference; 1 MB bodies take ~10 ms longer through
the relay, with ~35% less throughput. Where that matters more than a flat RSS,
set glibc's own MALLOC_MMAP_THRESHOLD_ (e.g. 1048576, so the buffers come from
the heap again): a threshold set by the user is left alone.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time
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


def resident_bytes() -> int:
    """This process's resident set size, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def trim_periodically(interval: float, observe: Callable[[float, int], None]) -> None:
    """Trim the heap every `interval` seconds until cancelled; `observe(pause
    in seconds, bytes of RSS released)` after each trim."""
    trim = heap_trimmer()
    if trim is None:
        return
    while True:
        await asyncio.sleep(interval)
        before = resident_bytes()
        t0 = time.perf_counter()
        trim()
        observe(time.perf_counter() - t0, max(0, before - resident_bytes()))
