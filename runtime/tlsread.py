"""TLS reads without the 256 KiB temporary buffer, for the edge's and the
agent's SSL contexts (part of the process runtime, like `allocator.py`).

Why: on their copying read path, asyncio and uvloop read TLS with
`SSLObject.read(256 KiB)`. CPython allocates the whole 256 KiB for every
call, including the last one of each read event that finds nothing, and
shrinks it to what arrived, which is at most one TLS record (16 KiB). With
glibc's mmap threshold pinned at 128 KiB (allocator.py: a flat RSS), every
such buffer is an mmap, its page faults and a munmap: on a 1 MB upload this
was a third of the edge's CPU (`SSLObject.read` in the profile).

Capping the size asked of each read at one record's worth changes nothing
else: the event loop keeps calling `read()` until OpenSSL has no more, so a
smaller cap can only mean more calls, and a record's plaintext never
exceeds 16 KiB. The buffers are then ordinary small heap blocks, freed as
soon as the bytes are passed on; nothing is held per connection.
"""

from __future__ import annotations

import ssl
from typing import Any

READ_CAP = 16 * 1024  # the largest plaintext of one TLS record (RFC 8446 5.1, RFC 5246 6.2.1)


class RecordSizedReads(ssl.SSLObject):
    """An `SSLObject` whose copying `read()` asks for at most one record."""

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        if buffer is None and len > READ_CAP:
            len = READ_CAP
        return super().read(len, buffer)


def record_sized_reads(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Make the connections of `ctx` (made with `wrap_bio`, as asyncio and
    uvloop do) read at most one record's worth per call. Returns `ctx`."""
    ctx.sslobject_class = RecordSizedReads
    return ctx
