"""A direct worker that goes silent (its VPN path dies, or the host freezes)
while requests wait for its answer: once the health checks mark it down for
getting no answer at all, those requests end (retried on another worker when
that is safe, else 502) instead of hanging until --upstream-timeout. Found by
tests/netns/test_vpn_nat.py: stopping a worker's WireGuard left a request on
a pooled keep-alive connection hanging for the whole upstream timeout."""

from __future__ import annotations

import asyncio
import signal
import time

from tests.harness import System

UPSTREAM_TIMEOUT = 30.0


async def test_requests_waiting_on_a_silent_direct_worker_end_when_checks_mark_it_down(system: System):
    p1, up1 = await system.upstream("up1")
    _, up2 = await system.upstream("up2")
    _, edge = await system.edge("edge", None, "--direct", f"solo={up1},id=d1", "--direct", f"pair={up1},id=d2",
                                "--direct", f"pair={up2},id=d3", "--upstream-timeout", str(UPSTREAM_TIMEOUT),
                                "--check-timeout", "0.5", "--unhealthy-threshold", "2",
                                "--direct-connect-timeout", "0.5")
    await system.wait_available(edge, ["d1", "d2", "d3"])
    http = system.http()

    async def get(pool: str, method: str = "GET") -> tuple[int, str, float]:
        t0 = time.monotonic()
        async with http.request(method, edge + "/", headers={**system.auth(), "X-Pool": pool}) as r:
            return r.status, await r.text(), time.monotonic() - t0

    p1.signal(signal.SIGSTOP)  # connections still open (the kernel's backlog), nothing answers
    try:
        solo, solo_post, pair = await asyncio.gather(get("solo"), get("solo", "POST"),
                                                     asyncio.gather(*(get("pair") for _ in range(6))))
    finally:
        p1.signal(signal.SIGCONT)
    # Marked down after 2 unanswered checks (interval 0.5 + timeout 0.5 each): far below the upstream timeout.
    status, text, took = solo
    assert status in (502, 503) and took < UPSTREAM_TIMEOUT / 3, (status, text, took)  # retried: no one else
    status, text, took = solo_post  # not retried (it may have been processed): a 502 that says why
    assert status == 502 and "stopped answering" in text and took < UPSTREAM_TIMEOUT / 3, (status, text, took)
    # In a pool with a live worker, the waiting GETs move there.
    assert all(s == 200 for s, _t, _d in pair), pair
    assert max(d for _s, _t, d in pair) < UPSTREAM_TIMEOUT / 3, pair


async def test_a_worker_that_answers_its_checks_with_an_error_keeps_its_waiting_requests(system: System):
    """A 503 from the health path is a worker that is there (busy, draining), not a dead path:
    its slow requests are left to finish."""
    _, up = await system.upstream("up")
    _, edge = await system.edge("edge", None, "--direct", f"default={up},id=d1", "--unhealthy-threshold", "2")
    await system.wait_available(edge, ["d1"])
    http = system.http()
    async with http.get(up + "/set-delay/4000"):
        pass
    async with http.get(up + "/set-health/off"):
        pass
    t0 = time.monotonic()
    async with http.get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200, await r.text()
    assert time.monotonic() - t0 >= 3.5
