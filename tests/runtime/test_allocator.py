"""The allocator setting of the edge and the agent: with the mmap threshold
pinned, glibc no longer moves large temporary buffers onto the heap after it
has freed a larger block (the path that fragmented the edge's heap)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest

from runtime import allocator
from tests.harness import ROOT

# Runs in a fresh interpreter, so no earlier allocation in the test process
# has moved the threshold. Prints 1 if an 8 MiB block allocated after a 16 MiB
# block was freed is mmapped, 0 if it came from the heap. (glibc serves a
# request from free space at the heap's top before it looks at the threshold;
# the sizes are far above what the top ever has free, so only the threshold
# decides. The buffers of the real case are 256 KiB: the same rule.)
PROBE = """
import ctypes, ctypes.util, sys
from runtime import allocator
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "pinned":
    assert allocator.pin_mmap_threshold()
big = libc.malloc(16 << 20)
libc.free(big)  # the dynamic rule raises the threshold to 16 MiB here
before = libc.mallinfo2().hblks
p = libc.malloc(8 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(p)
"""


def _glibc_with_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    return name is not None and hasattr(ctypes.CDLL(name), "mallinfo2")


needs_glibc = pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")


def probe(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV}
    r = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


@needs_glibc
def test_without_the_pin_a_freed_large_block_moves_large_buffers_onto_the_heap() -> None:
    assert probe("default") == 0


@needs_glibc
def test_pinned_threshold_keeps_large_buffers_mmapped() -> None:
    assert probe("pinned") == 1


def test_a_threshold_chosen_by_the_user_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(allocator.ENV, "65536")
    assert allocator.pin_mmap_threshold() is False
