"""The batching policy with a fake clock, and the asyncio batcher around it."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from inference.batcher import Batcher, BatchPolicy, QueueFull

INF = float("inf")


async def wait_depth(b: Batcher, n: int, timeout: float = 10) -> None:
    async def reached() -> None:
        while b.depth < n:  # noqa: ASYNC110 - polling a plain counter, bounded by wait_for
            await asyncio.sleep(0.001)
    await asyncio.wait_for(reached(), timeout)


@pytest.mark.parametrize("queued,oldest,now,expected", [
    (0, None, 5.0, (0, INF)),          # nothing to do
    (8, 1.000, 1.000, (8, 0.0)),       # a full batch runs at once
    (20, 1.000, 1.000, (8, 0.0)),      # never more than max_batch
    (3, 1.000, 1.001, (0, 0.001)),     # wait for company until the oldest is due
    (3, 1.000, 1.002, (3, 0.0)),       # due: run what is there
    (1, 1.000, 9.000, (1, 0.0)),
])
def test_policy_table(queued: int, oldest: float | None, now: float, expected: tuple[int, float]) -> None:
    n, wait = BatchPolicy(max_batch=8, timeout=0.002).next_action(queued, oldest, now)
    assert n == expected[0] and wait == pytest.approx(expected[1], abs=1e-9)


def test_zero_timeout_runs_whatever_is_queued_and_batch_one_is_off() -> None:
    assert BatchPolicy(8, 0.0).next_action(3, 1.0, 1.0) == (3, 0.0)
    assert BatchPolicy(1, 0.5).next_action(5, 1.0, 1.0) == (1, 0.0)
    with pytest.raises(ValueError):
        BatchPolicy(0, 0.0)


class GatedModel:
    """Row i of the answer is the sum of input i, so each caller can check it
    got its own row; a gate holds the first batch so others pile up."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def __call__(self, batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(len(batch))
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)


async def test_each_caller_gets_its_own_row_and_batches_form_while_busy() -> None:
    model = GatedModel()
    with ThreadPoolExecutor(1) as pool:
        b = Batcher(model, BatchPolicy(4, 0.0), max_queue=100, executor=pool)
        b.start()
        try:
            first = asyncio.create_task(b.submit(np.full((2,), 1000.0)))
            assert await asyncio.to_thread(model.entered.wait, 10), "first batch never started"
            calls = [asyncio.create_task(b.submit(np.full((2,), float(i)))) for i in range(10)]
            await wait_depth(b, 10)
            model.gate.set()
            results = await asyncio.gather(first, *calls)
        finally:
            await b.stop()
    assert results[0].probs[0] == 2000.0
    assert [r.probs[0] for r in results[1:]] == [2.0 * i for i in range(10)]
    assert model.batches == [1, 4, 4, 2]
    assert results[1].batch_size == 4 and results[1].queue_s > 0


async def test_full_queue_refuses_and_a_failed_batch_does_not_stop_the_batcher() -> None:
    calls = {"n": 0}

    def flaky(batch: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("model fell over")
        return np.zeros((len(batch), 1))

    with ThreadPoolExecutor(1) as pool:
        b = Batcher(flaky, BatchPolicy(2, 0.0), max_queue=2, executor=pool)
        first = asyncio.create_task(b.submit(np.zeros(1)))
        second = asyncio.create_task(b.submit(np.zeros(1)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit(np.zeros(1))
        b.start()
        for t in (first, second):
            with pytest.raises(RuntimeError, match="fell over"):
                await t
        ok = await b.submit(np.zeros(1))
        assert ok.batch_size == 1
        await b.stop()


async def test_a_caller_that_gave_up_is_not_run() -> None:
    model = GatedModel()
    with ThreadPoolExecutor(1) as pool:
        b = Batcher(model, BatchPolicy(8, 0.0), max_queue=10, executor=pool)
        b.start()
        busy = asyncio.create_task(b.submit(np.zeros(1)))
        assert await asyncio.to_thread(model.entered.wait, 10), "first batch never started"
        gone = asyncio.create_task(b.submit(np.zeros(1)))
        kept = asyncio.create_task(b.submit(np.ones(1)))
        await wait_depth(b, 2)
        gone.cancel()
        model.gate.set()
        await busy
        assert (await kept).probs[0] == 1.0
        await b.stop()
    assert model.batches == [1, 1]
