"""Worker identity and health path, with real processes: two agents on one
host are two workers; a second process claiming a live worker's id is
refused and the first keeps serving; the edge checks each worker at the
path its agent declared; an aborted upload is an ordinary, counted event."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time

import pytest

from bench.procstats import labelled
from tests.harness import System, wait_for

REFUSAL = "edge refused agent id 'w1': another worker process already uses it; give each agent its own --id (AGENT_ID)"


async def test_two_agents_on_one_host_with_default_ids_are_two_workers_and_both_serve(system: System):
    # The same host and the same upstream port: only the default id's random
    # part tells them apart (two containers sharing the host's name).
    _, up = await system.upstream()
    edge_p, edge = await system.edge()
    system.agent("a", edge, up, default_id=True)
    system.agent("b", edge, up, default_id=True)

    async def two_available() -> bool:
        ws = await system.workers(edge)
        return len(ws) == 2 and all(w["available"] for w in ws.values())

    await wait_for(two_available, 20, lambda: "two workers at /_edge/workers\n" + system.logs())
    workers = await system.workers(edge)
    port = up.rsplit(":", 1)[1]
    host = socket.gethostname().split(".")[0]
    for wid in workers:
        assert wid.startswith(f"{host}-{port}-"), wid  # readable: host and upstream port
    assert len({w["instance"] for w in workers.values()}) == 2

    http = system.http()
    sem = asyncio.Semaphore(16)

    async def one() -> int:
        async with sem, http.get(edge + "/work?ms=5", headers=system.auth()) as r:
            assert r.status == 200, await r.text()
            return r.status

    assert len(await asyncio.gather(*(one() for _ in range(200)))) == 200
    after = await system.workers(edge)
    assert set(after) == set(workers), "the same two workers, none replaced"
    assert all(w["served"] > 0 for w in after.values()), after
    assert sum(int(w["served"]) for w in after.values()) >= 200
    assert "replacing its stale tunnel" not in edge_p.log()


async def test_second_agent_on_a_live_id_is_refused_and_the_first_keeps_serving(system: System):
    _, up = await system.upstream()
    edge_p, edge = await system.edge()
    first = system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    instance = (await system.workers(edge))["w1"].get("instance")

    http = system.http()
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            async with http.get(edge + "/work?ms=20", headers=system.auth()) as r:
                await r.read()
                statuses.append(r.status)

    loaders = [asyncio.create_task(load()) for _ in range(6)]
    try:
        twin = system.agent("w1-twin", edge, up, "--id", "w1")  # the later --id wins

        async def refused_three_times() -> bool:
            return edge_p.log().count("refused the newcomer") >= 3

        await wait_for(refused_three_times, 30, lambda: "three refusals of the twin\n" + system.logs())
    finally:
        stop.set()
        await asyncio.gather(*loaders)

    assert len(statuses) > 50 and set(statuses) == {200}, f"{len(statuses)} requests: {sorted(set(statuses))}"
    assert twin.alive(), "a refused agent backs off and stays, it does not exit"
    assert twin.log().count("edge refused agent id") == 1, twin.log()  # one line, however many refusals
    assert REFUSAL in twin.log()
    assert "WARNING" in edge_p.log() and "claims agent id 'w1'" in edge_p.log()
    assert "replacing its stale tunnel" not in edge_p.log()
    w1 = (await system.workers(edge))["w1"]
    assert w1["instance"] == instance and w1["available"], "the first worker is untouched"
    async with http.get(edge + "/_edge/metrics", headers=system.auth()) as r:
        assert labelled(await r.text(), "edge_tunnel_refusals_total").get("duplicate_id", 0) >= 3

    # Once the first process is gone, the twin's later retry gets in.
    first.stop()

    async def twin_serves() -> bool:
        ws = await system.workers(edge)
        return "w1" in ws and ws["w1"]["instance"] != instance and bool(ws["w1"]["available"])

    await wait_for(twin_serves, 45, lambda: "the twin to take over w1\n" + system.logs())
    async with http.get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200


async def test_worker_checked_at_its_declared_health_path_stays_served(system: System):
    # A KServe/Triton-style upstream: health only at /v2/health/ready, 404 at /healthz.
    _, up = await system.upstream(health_path="/v2/health/ready")
    edge_p, edge = await system.edge()
    system.agent("w1", edge, up, "--health-path", "/v2/health/ready")
    # Without the flag the agent probes /healthz: its detail names the answer.
    system.agent("w2", edge, up, pool="legacy")
    await system.wait_available(edge, ["w1"])
    http = system.http()
    deadline = time.monotonic() + 20
    served = 0
    while time.monotonic() < deadline:
        async with http.get(edge + "/", headers=system.auth()) as r:
            assert r.status == 200, f"after {served} requests: {r.status} {await r.text()}\n{system.logs()}"
        served += 1
        if served % 10 == 0:
            w1 = (await system.workers(edge))["w1"]
            assert w1["health"] == "healthy" and w1["available"], w1
        await asyncio.sleep(0.05)
    w1 = (await system.workers(edge))["w1"]
    assert w1["health_path"] == "/v2/health/ready" and w1["last_check_error"] == "", w1
    assert "checked at /v2/health/ready" in edge_p.log()

    w2 = (await system.workers(edge))["w2"]
    assert not w2["available"] and "GET /healthz -> 404" in str(w2["health_detail"]), w2
    assert w2["health_path"] == "/healthz"
    assert "GET /healthz -> 404" in edge_p.log()
    async with http.get(edge + "/_edge/api/overview", headers=system.auth()) as r:
        shown = {w["id"]: w for w in (await r.json())["workers"]}
    assert "GET /healthz -> 404" in shown["w2"]["health_detail"]  # the inspector says why too


@pytest.mark.parametrize("kind", ["tunnel", "direct"])
async def test_client_aborting_a_large_upload_is_counted_not_an_asyncio_error(system: System, kind: str):
    _, up = await system.upstream()
    edge_p, edge = await system.edge("edge", None, *(["--direct", f"default={up},id=w1"] if kind == "direct" else []))
    if kind == "tunnel":
        system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    host, port = edge.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=str(system.pki.ca))
    aborts = 4
    for _ in range(aborts):
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname="localhost")
        writer.write(f"POST /echo HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {system.pki.client_key}\r\n"
                     "Content-Length: 50000000\r\n\r\n".encode())
        for _ in range(40):  # 4 MB of the announced 50 MB
            writer.write(b"u" * 100_000)
            await writer.drain()
        # Cut the connection with a RST, as a crashing client or a dropped link does.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        await asyncio.sleep(0.2)

    http = system.http()

    async def counted() -> bool:
        async with http.get(edge + "/_edge/metrics", headers=system.auth()) as r:
            return sum(labelled(await r.text(), "edge_upload_aborts_total").values()) >= aborts

    await wait_for(counted, 15, lambda: "every aborted upload counted\n" + edge_p.log())
    # The edge still serves, and nothing was left for asyncio to report.
    async with http.post(edge + "/echo", data=b"x" * 1_000_000, headers=system.auth()) as r:
        assert r.status == 200 and len(await r.read()) == 1_000_000
    log = edge_p.log()
    assert "Task exception was never retrieved" not in log, log
    assert "the client aborted its upload" in log
    w1 = (await system.workers(edge))["w1"]
    assert w1["errors"] == 0 and w1["health"] == "healthy", w1  # the client's abort says nothing of the worker
