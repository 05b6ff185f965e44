"""End-to-end behaviour of edge + agent + upstream as real processes on
loopback, with real TLS from the generated CA."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bench.procstats import metric
from runtime import allocator
from tests.harness import System, free_port, wait_for
from tunnel import Connection, ErrorCode, Hello, Role
from tunnel.frames import FrameType, encode_frame


async def start_one(system: System, *edge_args: str, capacity: int = 8):
    _, up = await system.upstream()
    _, edge = await system.edge("edge", None, *edge_args)
    system.agent("w1", edge, up, capacity=capacity)
    await system.wait_available(edge, ["w1"])
    return up, edge


async def test_500_concurrent_requests_over_one_tunnel_each_get_their_own_answer(system: System):
    _, edge = await start_one(system, capacity=1000)
    http = system.http()
    bodies = [os.urandom(1 + i * 37 % 20000) for i in range(500)]

    async def one(body: bytes) -> tuple[bytes, bytes]:
        async with http.post(edge + "/echo", data=body, headers=system.auth()) as r:
            assert r.status == 200, await r.text()
            return body, await r.read()

    results = await asyncio.gather(*(one(b) for b in bodies))
    assert len(results) == 500
    for sent, got in results:
        assert hashlib.sha256(sent).digest() == hashlib.sha256(got).digest()


async def test_two_workers_share_a_pool_and_capacity_1_never_sees_2_in_flight(system: System):
    up1p, up1 = await system.upstream("up1")
    up2p, up2 = await system.upstream("up2")
    _, edge = await system.edge()
    system.agent("w1", edge, up1, capacity=1)
    system.agent("w2", edge, up2, capacity=3)
    await system.wait_available(edge, ["w1", "w2"])
    http = system.http()

    async def one() -> int:
        async with http.get(edge + "/work?ms=30", headers=system.auth()) as r:
            assert r.status == 200, await r.text()
            return int(await r.text())

    pids = await asyncio.gather(*(one() for _ in range(40)))
    assert {up1p.pid, up2p.pid} == set(pids)
    stats = {}
    for name, url in (("w1", up1), ("w2", up2)):
        async with http.get(url + "/stats") as r:
            stats[name] = await r.json()
    assert stats["w1"]["max_in_flight"] == 1
    assert stats["w2"]["max_in_flight"] <= 3
    assert stats["w1"]["served"] + stats["w2"]["served"] == 40


async def test_agent_killed_mid_request_gives_fast_error_and_pool_keeps_serving(system: System):
    _, up1 = await system.upstream("up1")
    _, up2 = await system.upstream("up2")
    _, edge = await system.edge()
    a1 = system.agent("w1", edge, up1, capacity=4)
    await system.wait_available(edge, ["w1"])
    system.agent("w2", edge, up2, capacity=4)
    await system.wait_available(edge, ["w1", "w2"])
    http = system.http()

    async def slow_post() -> tuple[int, float]:
        async with http.post(edge + "/work?ms=10000", data=b"x", headers=system.auth()) as r:
            await r.read()
            return r.status, time.monotonic()

    tasks = [asyncio.create_task(slow_post()) for _ in range(6)]
    await wait_for(lambda: _in_flight(system, edge, "w1"), 10, "a request in flight on w1")
    a1.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    outcomes = []
    for t in tasks:
        status, finished = await t
        outcomes.append((status, finished - killed_at))
    failed = [o for o in outcomes if o[0] != 200]
    assert failed, "some requests were on the killed worker"
    for status, after in failed:
        assert status in (502, 503)
        assert after < 3.0 + 1.0  # dead-tunnel deadline (3 s) plus margin for a loaded machine
    async with http.get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200


async def _in_flight(system: System, edge: str, name: str) -> bool:
    ws = await system.workers(edge)
    return name in ws and int(ws[name]["in_flight"]) > 0


async def test_edge_restart_agents_reconnect_and_serve_within_5s(system: System):
    _, up = await system.upstream()
    port = free_port()
    edge_proc, edge = await system.edge("edge", port)
    system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    edge_proc.signal(signal.SIGKILL)
    edge_proc.p.wait(5)
    _, edge = await system.edge("edge2", port)
    restarted = time.monotonic()
    http = system.http()

    async def serves() -> bool:
        async with http.get(edge + "/", headers=system.auth()) as r:
            return r.status == 200

    await wait_for(serves, 15, lambda: "agent to serve again\n" + system.logs())
    assert time.monotonic() - restarted < 5.0 + 1.0


async def test_upstream_down_makes_worker_unhealthy_and_traffic_returns_when_up(system: System):
    _, up1 = await system.upstream("up1")
    up2p, up2 = await system.upstream("up2")
    _, edge = await system.edge()
    system.agent("w1", edge, up1)
    system.agent("w2", edge, up2)
    await system.wait_available(edge, ["w1", "w2"])
    http = system.http()
    async with http.get(up2 + "/set-health/down") as r:
        assert r.status == 200

    async def w2_out() -> bool:
        return not (await system.workers(edge))["w2"]["available"]

    await wait_for(w2_out, 10, "w2 to be marked unhealthy")
    pids = set()
    for _ in range(20):
        async with http.get(edge + "/", headers=system.auth()) as r:
            assert r.status == 200
            pids.add(r.headers["X-Upstream-Pid"])
    assert str(up2p.pid) not in pids
    async with http.get(up2 + "/set-health/up") as r:
        assert r.status == 200
    await system.wait_available(edge, ["w2"], timeout=10)
    for _ in range(40):
        async with http.get(edge + "/", headers=system.auth()) as r:
            pids.add(r.headers["X-Upstream-Pid"])
    assert str(up2p.pid) in pids


async def test_whole_upstream_process_down_gives_503_then_recovers(system: System):
    up_proc, up = await system.upstream()
    port = int(up.rsplit(":", 1)[1])
    _, edge = await system.edge()
    system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    up_proc.kill()
    http = system.http()

    async def refused() -> bool:
        async with http.get(edge + "/", headers=system.auth()) as r:
            return r.status == 503 and "Retry-After" in r.headers

    await wait_for(refused, 10, "503 once the upstream is gone")
    await system.upstream("up-again", port)
    await system.wait_available(edge, ["w1"], timeout=10)
    async with http.get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200


async def test_client_auth_rate_limit_body_limit_and_pools(system: System):
    _, edge = await start_one(system, "--max-body", "100000")
    http = system.http()
    async with http.get(edge + "/") as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await r.json())["code"] == "unauthorized"
    async with http.get(edge + "/", headers={"X-API-Key": "eik_wrong"}) as r:
        assert r.status == 401
    async with http.get(edge + "/", headers={"Authorization": f"Bearer {system.pki.worker_token}"}) as r:
        assert r.status == 401  # a worker token is not a client key
    async with http.post(edge + "/echo", data=b"x" * 100001, headers={"X-API-Key": system.pki.plain_key}) as r:
        assert r.status == 413
    async with http.get(edge + "/", headers={"X-API-Key": system.pki.plain_key, "X-Pool": "nope"}) as r:
        assert r.status == 404
        assert "default" in (await r.json())["detail"]
    async with http.get(edge + "/pools/nope/", headers={"X-API-Key": system.pki.plain_key}) as r:
        assert r.status == 404
    async with http.get(edge + "/_edge/workers", headers={"X-API-Key": system.pki.plain_key}) as r:
        assert r.status == 403  # not an admin key
    statuses = []
    for _ in range(10):
        async with http.get(edge + "/pools/default/", headers={"X-API-Key": system.pki.limited_key}) as r:
            statuses.append(r.status)
            if r.status == 429:
                assert int(r.headers["Retry-After"]) >= 1
    assert 429 in statuses and statuses[0] in (200, 429)


async def test_chunked_body_over_the_limit_is_413(system: System):
    _, edge = await start_one(system, "--max-body", "100000")

    async def gen():
        for _ in range(20):
            yield b"y" * 10000

    async with system.http().post(edge + "/echo", data=gen(), headers=system.auth()) as r:
        assert r.status == 413


async def test_client_key_is_refused_as_worker_token_and_ids_are_bound_to_tokens(system: System):
    _, edge = await start_one(system)
    ctx = system.pki.client_ssl()
    ws_url = edge.replace("https://", "wss://") + "/_edge/tunnel"
    with pytest.raises(InvalidStatus) as info:
        async with connect(ws_url, ssl=ctx, additional_headers={"Authorization": f"Bearer {system.pki.client_key}"}):
            pass
    assert info.value.response.status_code == 401
    # Another team's token cannot take over the id "w1".
    async with connect(ws_url, ssl=ctx, additional_headers={"Authorization": f"Bearer {system.pki.other_worker_token}"},
                       ping_interval=None) as ws:
        conn = Connection(Role.AGENT)
        conn.send_hello(Hello("w1", capacity=1))
        await ws.send(conn.data_to_send())
        reply = await asyncio.wait_for(ws.recv(), 5)
        assert reply[0] == FrameType.GOAWAY
    assert (await system.workers(edge))["w1"]["available"]


async def test_rogue_agent_sending_garbage_loses_its_tunnel_only(system: System):
    _, edge = await start_one(system)
    ctx = system.pki.client_ssl()
    ws_url = edge.replace("https://", "wss://") + "/_edge/tunnel"
    async with connect(ws_url, ssl=ctx, additional_headers={"Authorization": f"Bearer {system.pki.worker_token}"},
                       ping_interval=None) as ws:
        conn = Connection(Role.AGENT)
        conn.send_hello(Hello("rogue", capacity=2))
        await ws.send(conn.data_to_send())
        await asyncio.wait_for(ws.recv(), 5)  # WELCOME
        await wait_for(lambda: _has_worker(system, edge, "rogue"), 5, "rogue registered")
        await ws.send(encode_frame(FrameType.DATA, 77, b"garbage") + b"\xff" * 50)
        received = []
        with pytest.raises(ConnectionClosed):
            while True:
                received.append(await asyncio.wait_for(ws.recv(), 5))
        # The edge said why before closing: a GOAWAY with PROTOCOL_ERROR.
        goaways = [m for m in received if m[0] == FrameType.GOAWAY]
        assert goaways and int.from_bytes(goaways[-1][14:18], "big") == ErrorCode.PROTOCOL_ERROR
    await wait_for(lambda: _gone(system, edge, "rogue"), 5, "rogue removed")
    async with system.http().get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200
    assert (await system.workers(edge))["w1"]["available"]


async def _has_worker(system: System, edge: str, name: str) -> bool:
    return name in await system.workers(edge)


async def _gone(system: System, edge: str, name: str) -> bool:
    return name not in await system.workers(edge)


async def test_sse_first_event_arrives_before_the_upstream_finishes(system: System):
    up, edge = await start_one(system)
    http = system.http()
    async with http.get(edge + "/sse", headers=system.auth()) as r:
        assert r.status == 200
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
        assert first == b"data: first\n\n"
        # Only now is the upstream allowed to finish.
        async with http.get(up + "/sse-release") as rel:
            assert rel.status == 200
        rest = await asyncio.wait_for(r.content.read(), 10)
        assert rest == b"data: second\n\n"


async def test_pools_by_header_and_prefix_route_to_their_workers(system: System):
    gp, gpu_up = await system.upstream("gpu-up")
    cp, cpu_up = await system.upstream("cpu-up")
    _, edge = await system.edge()
    system.agent("g1", edge, gpu_up, pool="gpu")
    system.agent("c1", edge, cpu_up, pool="cpu")
    await system.wait_available(edge, ["g1", "c1"])
    http = system.http()
    async with http.get(edge + "/", headers={**system.auth(), "X-Pool": "gpu"}) as r:
        assert r.headers["X-Upstream-Pid"] == str(gp.pid)
    async with http.get(edge + "/pools/cpu/", headers=system.auth()) as r:
        assert r.headers["X-Upstream-Pid"] == str(cp.pid)
    async with http.get(edge + "/", headers=system.auth()) as r:
        assert r.status == 503  # the default pool has no worker


async def test_upstream_hang_is_504_at_the_timeout_and_frees_the_slot(system: System):
    up, edge = await start_one(system, "--upstream-timeout", "1", capacity=1)
    http = system.http()
    async with http.get(edge + "/hang", headers=system.auth()) as r:
        assert r.status == 504
    async with http.get(up + "/stats") as r:
        stats = await r.json()

    async def upstream_freed() -> bool:
        async with http.get(up + "/stats") as r:
            return (await r.json())["in_flight"] == 0

    await wait_for(upstream_freed, 5, "the hung upstream request to be cancelled")
    assert stats["max_in_flight"] >= 1
    async with http.get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200  # capacity 1: the slot was released


async def test_client_disconnect_cancels_the_upstream_request(system: System):
    up, edge = await start_one(system)
    http = system.http()
    task = asyncio.create_task(http.get(edge + "/hang", headers=system.auth()))

    async def hanging() -> bool:
        async with http.get(up + "/stats") as r:
            return (await r.json())["in_flight"] == 1

    await wait_for(hanging, 5, "the request to reach the upstream")
    task.cancel()

    async def cancelled() -> bool:
        async with http.get(up + "/stats") as r:
            return (await r.json())["in_flight"] == 0

    await wait_for(cancelled, 5, "the upstream request to be cancelled")
    ws = await system.workers(edge)
    assert ws["w1"]["in_flight"] == 0


async def test_agent_sigterm_drains_in_flight_and_exits_0(system: System):
    _, up = await system.upstream()
    _, edge = await system.edge()
    a = system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    http = system.http()
    task = asyncio.create_task(http.get(edge + "/work?ms=1000", headers=system.auth()))
    await wait_for(lambda: _in_flight(system, edge, "w1"), 5, "request in flight")
    a.signal(signal.SIGTERM)
    r = await task
    assert r.status == 200
    r.release()
    await wait_for(lambda: _exited(a), 10, "agent to exit")
    assert a.p.returncode == 0


async def _exited(p) -> bool:
    return not p.alive()


async def test_agent_with_wrong_ca_does_not_connect_and_says_why(system: System, tmp_path):
    from edge_proxy import certs

    other = certs.make_all(tmp_path / "other", ["localhost"])
    _, up = await system.upstream()
    _, edge = await system.edge()
    a = system.agent("w1", edge, up, "--ca", str(other["ca"]))

    async def logged() -> bool:
        return "certificate not trusted" in a.log()

    await wait_for(logged, 10, lambda: "the agent to report the untrusted certificate\n" + a.log())
    assert "w1" not in await system.workers(edge)


def test_edge_start_up_errors_are_one_line(pki, tmp_path):
    import subprocess
    import sys

    base = [sys.executable, "-m", "edge_proxy", "serve", "--client-keys", str(pki.client_keys), "--worker-tokens",
            str(pki.worker_tokens)]
    r = subprocess.run(base + ["--cert", str(tmp_path / "missing.pem"), "--key", str(pki.key), "--listen",
                               f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "certificate file not found" in r.stderr and "edge-proxy certs" in r.stderr
    assert "Traceback" not in r.stderr
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(base + ["--cert", str(pki.cert), "--key", str(pki.key), "--listen", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "already in use" in r.stderr and "Traceback" not in r.stderr


async def test_refused_request_is_retried_once_on_another_worker(system: System):
    up1p, up1 = await system.upstream("up1")
    _, up2 = await system.upstream("up2")
    _, edge = await system.edge("edge", None, "--check-interval", "30")
    system.agent("w1", edge, up1, "--health-interval", "30")
    system.agent("w2", edge, up2, "--health-interval", "30")
    await system.wait_available(edge, ["w1", "w2"])
    up1p.kill()  # w1's upstream refuses connections; nobody has noticed yet
    http = system.http()
    for _ in range(20):
        async with http.post(edge + "/echo", data=b"payload", headers=system.auth()) as r:
            assert r.status == 200
            assert await r.read() == b"payload"


async def test_agent_keeps_a_tunnel_to_every_edge(system: System):
    _, up = await system.upstream()
    _, edge_a = await system.edge("edge-a")
    _, edge_b = await system.edge("edge-b")
    ws_b = edge_b.replace("https://", "wss://") + "/_edge/tunnel"
    system.agent("w1", edge_a, up, "--edge", ws_b, "--tunnels-per-edge", "2")
    await system.wait_available(edge_a, ["w1"])
    await system.wait_available(edge_b, ["w1"])
    assert (await system.workers(edge_a))["w1"]["tunnels"] == ["0", "1"]
    for edge in (edge_a, edge_b):
        async with system.http().get(edge + "/", headers=system.auth()) as r:
            assert r.status == 200


async def test_status_pages_metrics_and_readiness(system: System):
    _, edge = await start_one(system)
    http = system.http()
    async with http.get(edge + "/_edge/ready") as r:
        assert r.status == 200 and (await r.json())["healthy_workers"]["default"] == 1
    async with http.get(edge + "/") as r:
        assert r.status == 401
    async with http.get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200
    async with http.get(edge + "/_edge/metrics") as r:
        assert r.status == 401
    async with http.get(edge + "/_edge/metrics", headers=system.auth()) as r:
        text = await r.text()
    assert 'edge_requests_total{pool="default",status="200"}' in text
    assert "edge_tunnel_rtt_seconds" in text and 'edge_workers{pool="default",state="healthy"} 1.0' in text
    async with http.get(edge + "/_edge/", headers=system.auth()) as r:
        page = await r.text()
    assert "Edge inspector" in page  # the page reads the workers from /_edge/events (tests/relay/test_inspector.py)
    for trick in ("/%5F_edge/workers", "//_edge/workers", "/x/../_edge/workers"):
        async with http.get(edge + trick, headers={"X-API-Key": system.pki.plain_key}) as r:
            assert r.status in (403, 404), trick  # never proxied, never served to a non-admin key


@pytest.mark.skipif(allocator.heap_trimmer() is None, reason="malloc_trim is glibc's")
async def test_edge_returns_freed_heap_pages_on_its_interval_and_reports_them(system: System):
    _, edge = await system.edge("edge", None, "--malloc-trim-interval", "0.2")
    http = system.http()

    async def three_trims() -> bool:
        async with http.get(edge + "/_edge/metrics", headers=system.auth()) as r:
            return (metric(await r.text(), "edge_heap_trim_seconds_count") or 0) >= 3

    await wait_for(three_trims, 10, "three heap trims")
    _, quiet = await system.edge("quiet", None, "--malloc-trim-interval", "0")
    async with http.get(quiet + "/_edge/metrics", headers=system.auth()) as r:
        assert metric(await r.text(), "edge_heap_trim_seconds_count") == 0  # 0 turns it off


@pytest.mark.parametrize("kind", ["tunnel", "direct"])
async def test_edge_sigterm_drains_in_flight_requests_and_exits_0(system: System, kind: str):
    _, up = await system.upstream()
    edge_proc, edge = await system.edge("edge", None, *(["--direct", f"default={up},id=w1"] if kind == "direct"
                                                        else []))
    if kind == "tunnel":
        system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    http = system.http()
    task = asyncio.create_task(http.get(edge + "/work?ms=1000", headers=system.auth()))
    await wait_for(lambda: _in_flight(system, edge, "w1"), 5, "request in flight")
    edge_proc.signal(signal.SIGTERM)
    r = await task
    assert r.status == 200, (await r.text()) + system.logs()
    r.release()
    await wait_for(lambda: _exited(edge_proc), 10, "edge to exit")
    assert edge_proc.p.returncode == 0


async def test_every_client_facing_error_has_the_one_problem_shape(system: System):
    from httpcontract import problem

    up = (await system.upstream())[1]
    _, edge = await system.edge("edge", None, "--max-body", "1000")
    system.agent("w1", edge, up, "--upstream-timeout", "0.5")
    await system.wait_available(edge, ["w1"])
    http = system.http()
    key = {"X-API-Key": system.pki.plain_key}
    cases = [  # (method, path, headers, body, status, code): from the edge, then from the agent
        ("GET", "/", {}, None, 401, "unauthorized"),
        ("GET", "/", {**key, "X-Pool": "nope"}, None, 404, "unknown_pool"),
        ("POST", "/echo", key, b"x" * 1001, 413, "body_too_large"),
        ("GET", "/_edge/nothing", key, None, 404, "not_found"),
        ("GET", "/hang", key, None, 504, "upstream_timeout"),
    ]
    for method, path, headers, body, status, code in cases:
        async with http.request(method, edge + path, headers=headers, data=body) as r:
            answer = await r.json()
            assert r.status == status, (path, answer)
            assert r.headers["Content-Type"].startswith(problem.CONTENT_TYPE), path
            assert problem.is_problem(answer), answer
            assert (answer["status"], answer["code"]) == (status, code), answer
            assert answer["request_id"] == r.headers["X-Request-ID"]
            assert "Traceback" not in answer["detail"]
