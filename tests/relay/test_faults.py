"""Fault matrix with real processes: frozen agents, failing and slow
workers, mutual TLS for agents."""

from __future__ import annotations

import asyncio
import signal
import time

from edge_proxy import certs
from tests.harness import System, wait_for


async def test_frozen_agent_is_detected_within_3s_and_traffic_moves(system: System):
    up1p, up1 = await system.upstream("up1")
    up2p, up2 = await system.upstream("up2")
    _, edge = await system.edge()
    a1 = system.agent("w1", edge, up1, capacity=4)
    system.agent("w2", edge, up2, capacity=4)
    await system.wait_available(edge, ["w1", "w2"])
    http = system.http()

    async def slow() -> tuple[int, float]:
        async with http.post(edge + "/work?ms=20000", data=b"x", headers=system.auth()) as r:
            await r.read()
            return r.status, time.monotonic()

    tasks = [asyncio.create_task(slow()) for _ in range(4)]

    async def on_w1() -> bool:
        return int((await system.workers(edge))["w1"]["in_flight"]) > 0

    await wait_for(on_w1, 10, "a request in flight on w1")
    a1.signal(signal.SIGSTOP)  # half-open: the socket stays, nothing answers
    frozen_at = time.monotonic()

    async def w1_gone() -> bool:
        return "w1" not in await system.workers(edge)

    await wait_for(w1_gone, 6, "w1 to be declared dead")
    detected = time.monotonic() - frozen_at
    assert detected < 3.0 + 1.5, detected  # --dead-after 3 s plus margin for a loaded 2-core machine
    done = await asyncio.gather(*(asyncio.wait_for(t, 30) if i else t for i, t in enumerate(tasks)),
                                return_exceptions=True)
    failed_fast = [d for d in done if isinstance(d, tuple) and d[0] != 200]
    assert failed_fast and all(d[0] == 502 and d[1] - frozen_at < 3.0 + 1.5 for d in failed_fast)
    async with http.get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200 and r.headers["X-Upstream-Pid"] == str(up2p.pid)
    a1.signal(signal.SIGCONT)


async def test_worker_answering_500_is_ejected(system: System):
    _, good = await system.upstream("good")
    _, edge = await system.edge("edge", None, "--consecutive-failures", "3", "--base-ejection-time", "30")
    system.agent("good", edge, good)
    _, bad = await system.upstream("bad")
    system.agent("bad", edge, bad)
    await system.wait_available(edge, ["good", "bad"])
    http = system.http()
    async with http.get(bad + "/set-fail/on") as r:  # healthy /healthz, 500 for everything else
        assert r.status == 200

    async def get() -> int:
        async with http.get(edge + "/", headers=system.auth()) as r:
            return r.status

    # Batches of 4 at once: with requests in flight, least-outstanding sends
    # the next one to the idle worker, so the failing one surely gets its
    # share. (One at a time, both are idle and the EWMA tie-break decides; a
    # bad worker whose 500s come back a little slower would get no traffic.)
    statuses: list[int] = []
    for _ in range(10):
        statuses += await asyncio.gather(*(get() for _ in range(4)))
    ws = await system.workers(edge)
    assert ws["bad"]["health"] == "ejected" and ws["bad"]["ejections"] >= 1, (statuses, ws["bad"])
    # Each ejection comes after exactly 3 failures in a row; requests already
    # in flight to it when it is ejected (at most 3 of a batch) fail too.
    assert statuses.count(500) <= 3 * ws["bad"]["ejections"] + 3, statuses
    after = [await get() for _ in range(10)]
    assert after == [200] * 10


async def test_slow_worker_gets_a_smaller_share(system: System):
    fastp, fast = await system.upstream("fast")
    slowp, slow = await system.upstream("slow")
    _, edge = await system.edge()
    system.agent("fast", edge, fast, capacity=8)
    system.agent("slow", edge, slow, capacity=8)
    await system.wait_available(edge, ["fast", "slow"])
    http = system.http()
    for url, ms in ((fast, 5), (slow, 150)):
        async with http.get(f"{url}/set-delay/{ms}") as r:
            assert r.status == 200
    pids: list[str] = []

    async def client() -> None:
        for _ in range(15):
            async with http.get(edge + "/", headers=system.auth()) as r:
                assert r.status == 200
                pids.append(r.headers["X-Upstream-Pid"])

    await asyncio.gather(*(client() for _ in range(4)))
    share_slow = pids.count(str(slowp.pid)) / len(pids)
    assert share_slow < 0.3, share_slow


async def test_mutual_tls_for_agents(system: System, tmp_path):
    files = certs.make_all(system.pki.dir, ["localhost", "127.0.0.1"], workers=["w1"])
    _, up = await system.upstream()
    _, edge = await system.edge("edge", None, "--worker-ca", str(files["ca"]), "--require-worker-cert")
    no_cert = system.agent("nocert", edge, up)

    async def refused() -> bool:
        return "HTTP 401" in no_cert.log()

    await wait_for(refused, 10, lambda: "the agent without certificate to be refused\n" + no_cert.log())
    d = system.pki.dir
    system.agent("w1", edge, up, "--client-cert", str(d / "worker-w1.pem"), "--client-key", str(d / "worker-w1-key.pem"))
    await system.wait_available(edge, ["w1"])
    async with system.http().get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200
