"""Dynamic batching: requests wait in a bounded queue and run together, up to
`max_batch` at a time, waiting at most `timeout` for a batch to fill (Triton's
max_queue_delay). `BatchPolicy` is the decision, with time passed in;
`Batcher` is the asyncio shell that runs batches on one inference thread.
While a batch runs, new requests queue, so under load batches fill by
themselves; with `max_batch=1` batching is off."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np


class QueueFull(Exception):
    """The queue holds `max_queue` requests already; answer 503."""


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 8
    timeout: float = 0.002  # seconds the oldest request may wait for company

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.timeout < 0:
            raise ValueError("timeout must not be negative")

    def next_action(self, queued: int, oldest_enqueued: float | None, now: float) -> tuple[int, float]:
        """(how many to run now, or 0; seconds to wait before asking again)."""
        if queued <= 0 or oldest_enqueued is None:
            return 0, float("inf")
        if queued >= self.max_batch:
            return self.max_batch, 0.0
        due = oldest_enqueued + self.timeout
        if now >= due:
            return queued, 0.0
        return 0, due - now


@dataclass
class BatchResult:
    probs: np.ndarray[Any, Any]
    queue_s: float
    infer_s: float
    batch_size: int


@dataclass
class _Item:
    x: np.ndarray[Any, Any]
    future: asyncio.Future[BatchResult]
    enqueued: float


class Batcher:
    def __init__(self, predict: Callable[[np.ndarray[Any, Any]], np.ndarray[Any, Any]], policy: BatchPolicy,
                 max_queue: int, executor: Executor,
                 on_batch: Callable[[int, float], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.predict = predict
        self.policy = policy
        self.max_queue = max_queue
        self.executor = executor
        self.on_batch = on_batch
        self.clock = clock
        self._queue: collections.deque[_Item] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(QueueFull("server shutting down"))

    async def submit(self, x: np.ndarray[Any, Any]) -> BatchResult:
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"{len(self._queue)} requests already queued")
        fut: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(x, fut, self.clock()))
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Callers that gave up (client went away) are dropped unrun.
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()
            oldest = self._queue[0].enqueued if self._queue else None
            n, wait = self.policy.next_action(len(self._queue), oldest, self.clock())
            if n == 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), None if wait == float("inf") else wait)
                except TimeoutError:
                    pass
                continue
            items: list[_Item] = []
            while self._queue and len(items) < n:
                item = self._queue.popleft()
                if not item.future.done():
                    items.append(item)
            if not items:
                continue
            start = self.clock()
            try:
                batch = np.stack([i.x for i in items])
                probs = await loop.run_in_executor(self.executor, self.predict, batch)
                if len(probs) != len(items):
                    raise RuntimeError(f"model returned {len(probs)} rows for a batch of {len(items)}")
            except Exception as exc:  # the batch fails, the batcher keeps serving
                for i in items:
                    if not i.future.done():
                        i.future.set_exception(exc)
                continue
            infer = self.clock() - start
            if self.on_batch:
                self.on_batch(len(items), infer)
            for row, i in zip(probs, items, strict=True):
                if not i.future.done():
                    i.future.set_result(BatchResult(row, start - i.enqueued, infer, len(items)))
