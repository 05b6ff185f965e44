"""One tunnel stream as application code sees it: the response head (edge
side), the queue of received body chunks ending with None (or an error),
and the signal that the send window opened. `relay/io.py` (TunnelIO) fills
them from the tunnel's events."""

from __future__ import annotations

import asyncio
import collections

from tunnel.errors import StreamError
from tunnel.frames import ResponseHead


class _Chunks:
    """A stream's received body: chunks, then None at the end, or a
    StreamError. An `asyncio.Queue` without its per-stream cost (two
    deques, a dict of getters, a loop lookup): one deque, one waiter."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque[bytes | None | StreamError] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: bytes | None | StreamError) -> None:
        self.items.append(item)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def empty(self) -> bool:
        return not self.items

    def get_nowait(self) -> bytes | None | StreamError:
        return self.items.popleft()  # IndexError when empty, as asyncio.Queue's QueueEmpty

    async def get(self) -> bytes | None | StreamError:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.items.popleft()


class StreamChannel:
    """One stream as seen by application code: the response head (edge side),
    a queue of body chunks ending with None, and a send-window signal."""

    __slots__ = ("stream_id", "_head", "body", "_window", "error", "ended", "outbound")

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self._head: asyncio.Future[ResponseHead] | None = None  # made when first asked for (the agent never does)
        self.body = _Chunks()
        self._window: asyncio.Future[None] | None = None  # a sender waiting for credit
        self.error: StreamError | None = None
        self.ended = False  # the peer's END was read by the application
        self.outbound = 0  # request bytes handed to the tunnel

    @property
    def head(self) -> asyncio.Future[ResponseHead]:
        if self._head is None:
            self._head = asyncio.get_running_loop().create_future()
        return self._head

    def window_opened(self) -> None:
        w = self._window
        if w is not None and not w.done():
            w.set_result(None)

    async def wait_window(self) -> None:
        self._window = asyncio.get_running_loop().create_future()
        try:
            await self._window
        finally:
            self._window = None

    def fail(self, error: StreamError) -> None:
        if self.error is not None:
            return
        self.error = error
        head = self.head
        if not head.done():
            head.set_exception(error)
            head.exception()  # mark retrieved: nobody may await it
        self.body.put_nowait(error)
        self.window_opened()

    def read_nowait(self) -> bytes | None | StreamError | bool:
        """The next item if one is there (False if none): the fast path of `read`."""
        if self.ended:
            return None
        items = self.body.items
        if not items:
            return False
        item = items[0]
        if isinstance(item, StreamError):
            raise item  # left in place: later readers see it too
        items.popleft()
        if item is None:
            self.ended = True
        return item

    async def read(self) -> bytes | None:
        """The next body chunk, or None at the end. Raises StreamError."""
        if self.ended:
            return None
        item = await self.body.get()
        if isinstance(item, StreamError):
            self.body.items.appendleft(item)  # later readers see it too
            raise item
        if item is None:
            self.ended = True
        return item
