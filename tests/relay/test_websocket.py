"""WebSocket passthrough, client <-> edge <-> tunnel <-> agent <-> upstream,
with real processes over real TLS: messages both ways, close codes end to
end, auth at the upgrade (header and subprotocol), flow control, crashes,
idle timeout, drain, metrics and the Server-Timing of the 101."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import pytest
from websockets.asyncio.client import connect as ws_client

from tests.harness import System, wait_for

MAX = 2 * 1024 * 1024  # the edge's --ws-max-message in these tests


async def start(system: System, *edge_args: str, capacity: int = 8, kind: str = "tunnel") -> tuple[str, str]:
    """An edge and one worker `w1`: an agent's tunnel, or a direct worker the edge dials."""
    _, up = await system.upstream()
    direct = ["--direct", f"default={up},id=w1,capacity={capacity}"] if kind == "direct" else []
    _, edge = await system.edge("edge", None, "--ws-max-message", str(MAX), *edge_args, *direct)
    if kind == "tunnel":
        system.agent("w1", edge, up, capacity=capacity)
    await system.wait_available(edge, ["w1"])
    return edge, up


async def metrics(system: System, edge: str) -> str:
    async with system.http().get(edge + "/_edge/metrics", headers=system.auth()) as r:
        return await r.text()


async def upstream_ws_stats(system: System, up: str) -> dict[str, object]:
    async with system.http().get(up + "/ws-stats") as r:
        data: dict[str, object] = json.loads(await r.text())
        return data


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> aiohttp.WSMessage:
    return await ws.receive(timeout=timeout)


@pytest.mark.parametrize("kind", ["tunnel", "direct"])
async def test_messages_close_codes_and_server_timing(system: System, kind: str) -> None:
    edge, up = await start(system, kind=kind)
    wss = edge + "/ws"
    async with system.http().ws_connect(wss, headers=system.auth(), protocols=("inference.v1",), autoping=False,
                                        autoclose=False, max_msg_size=8 * MAX) as ws:
        assert ws.protocol == "inference.v1"
        timing = ws._response.headers.get("Server-Timing", "")
        hops = ("lb", "tunnel", "edge", "upstream", "agent") if kind == "tunnel" else ("lb", "upstream", "edge")
        for name in hops:
            assert f"{name};dur=" in timing, timing
        assert "Sec-WebSocket-Extensions" not in ws._response.headers  # no per-message compression
        await ws.send_str("hello ✓")
        assert (await receive(ws)).data == "hello ✓"
        await ws.send_bytes(b"\x00\xffbin")
        msg = await receive(ws)
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == b"\x00\xffbin"
        big = bytes(i % 253 for i in range(1024 * 1024))
        await ws.send_bytes(big)
        assert (await receive(ws)).data == big
        await ws.send_str(f"big:{1024 * 1024}")
        assert (await receive(ws)).data == bytes(i % 251 for i in range(1024 * 1024))
        # ping/pong end to end (the upstream answers the ping)
        await ws.ping(b"are you there")
        msg = await receive(ws)
        assert msg.type is aiohttp.WSMsgType.PONG and msg.data == b"are you there"
        await ws.send_str("ping:from upstream")
        msg = await receive(ws)
        assert msg.type is aiohttp.WSMsgType.PING and msg.data == b"from upstream"
        await ws.send_str("seen")
        seen = json.loads((await receive(ws)).data)
        assert seen["protocols"] == "inference.v1"
        assert "Authorization" not in seen["headers"] and system.pki.client_key not in json.dumps(seen)
        assert seen["extensions"] == ""
        # an upstream close code and reason reach the client as they are
        await ws.send_str("close:4321:why")
        msg = await receive(ws)
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        assert (msg.data, msg.extra) == (4321, "why")
        await ws.close()

    # a fragmented client message is reassembled and relayed whole
    ctx = system.pki.client_ssl()
    async with ws_client(edge.replace("https", "wss") + "/ws", ssl=ctx, additional_headers=system.auth(),
                         compression=None) as c:
        await c.send(["frag", "mented ", "message"])
        assert await asyncio.wait_for(c.recv(), 10) == "fragmented message"
        await c.send([b"\x01", b"\x02\x03"])
        assert await asyncio.wait_for(c.recv(), 10) == b"\x01\x02\x03"

    # a client close code and reason reach the upstream as they are
    async with system.http().ws_connect(wss, headers=system.auth()) as ws:
        await ws.send_str("x")
        await receive(ws)
        await ws.close(code=4000, message=b"bye")
        assert ws.close_code == 1000  # the upstream's answer (aiohttp answers 1000), relayed back

    async def upstream_saw_4000() -> bool:
        return [4000, ""] in (await upstream_ws_stats(system, up))["closes"]  # type: ignore[operator]

    await wait_for(upstream_saw_4000, 10, "the upstream to see close 4000")

    # messages beyond --ws-max-message: 1009 either way
    async with system.http().ws_connect(wss, headers=system.auth(), max_msg_size=8 * MAX) as ws:
        await ws.send_bytes(b"x" * (MAX + 1))
        msg = await receive(ws)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1009, msg
    async with system.http().ws_connect(wss, headers=system.auth(), max_msg_size=8 * MAX) as ws:
        await ws.send_str(f"big:{MAX + 1}")
        msg = await receive(ws)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1009, msg

    # The edge counts a close once its relay has finished, which may be just
    # after the client saw the close frame: wait for the counters to settle.
    async def counted() -> bool:
        text = await metrics(system, edge)
        return ('edge_websocket_closes_total{code="1009",pool="default"} 2.0' in text
                and 'edge_websockets_open{pool="default"} 0.0' in text)

    await wait_for(counted, 10, "the edge to count both 1009 closes and no open WebSocket")
    text = await metrics(system, edge)
    assert 'edge_websocket_closes_total{code="4321",pool="default"} 1.0' in text, text
    assert 'edge_websocket_messages_total{direction="to_upstream",pool="default"}' in text
    assert 'edge_websocket_bytes_total{direction="to_client",pool="default"}' in text
    assert 'edge_requests_total{pool="default",status="101"}' in text


@pytest.mark.parametrize("kind", ["tunnel", "direct"])
async def test_auth_subprotocol_and_refusals(system: System, kind: str) -> None:
    edge, up = await start(system, kind=kind)
    wss = edge + "/ws"
    key = system.pki.client_key
    # the browser form: key as a subprotocol beside the application's
    async with system.http().ws_connect(wss, protocols=("inference.v1", f"bearer.{key}")) as ws:
        assert ws.protocol == "inference.v1"
        await ws.send_str("seen")
        seen = json.loads((await receive(ws)).data)
        assert seen["protocols"] == "inference.v1"
        assert key not in json.dumps(seen) and "bearer." not in json.dumps(seen)
    # only the key offered: the answer must still be one the client offered
    async with system.http().ws_connect(wss, protocols=(f"bearer.{key}",)) as ws:
        assert ws.protocol == f"bearer.{key}"
        await ws.send_str("seen")
        seen = json.loads((await receive(ws)).data)
        assert seen["protocols"] == "" and key not in json.dumps(seen)
    # the pool prefix works as for HTTP
    async with system.http().ws_connect(edge + "/pools/default/ws", headers=system.auth()) as ws:
        await ws.send_str("pooled")
        assert (await receive(ws)).data == "pooled"

    before = await metrics(system, edge)
    for kwargs in ({}, {"protocols": ("inference.v1", "bearer.eik_wrong")},
                   {"headers": {"Authorization": "Bearer eik_wrong"}}):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await system.http().ws_connect(wss, **kwargs)  # type: ignore[arg-type]
        assert info.value.status == 401
    after = await metrics(system, edge)

    def bad_key(text: str) -> float:
        lines = [ln for ln in text.splitlines() if ln.startswith('edge_rejections_total{reason="bad_key"}')]
        return float(lines[0].split()[-1]) if lines else 0.0

    assert bad_key(after) - bad_key(before) == 3
    assert (await upstream_ws_stats(system, up))["open"] == 0

    # Upgrade is hop-by-hop: on a plain HTTP request it never reaches the agent
    # (where it would mean "open a WebSocket")
    async with system.http().post(edge + "/echo", data=b"plain", headers={
            **system.auth(), "Upgrade": "websocket", "Connection": "Upgrade"}) as r:
        assert r.status == 200 and await r.read() == b"plain"

    # the upstream refuses the upgrade: the client gets its status as plain HTTP
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await system.http().ws_connect(edge + "/ws-refuse", headers=system.auth())
    assert info.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await system.http().ws_connect(edge + "/no-such-ws", headers=system.auth())
    assert info.value.status == 404


async def test_slow_reader_holds_back_only_its_own_stream(system: System) -> None:
    edge, up = await start(system)
    wss = edge + "/ws"
    n, size = 64, 1024 * 1024
    async with system.http().ws_connect(wss, headers=system.auth(), max_msg_size=4 * size) as slow:
        # The upstream pushes 64 MiB at a client that reads nothing for now.
        for _ in range(n):
            await slow.send_str(f"big:{size}")

        async def upstream_blocked() -> bool:
            # Backpressure reaches the upstream: its sends stop completing.
            a = (await upstream_ws_stats(system, up))["big_sent"]
            await asyncio.sleep(0.5)
            b = (await upstream_ws_stats(system, up))["big_sent"]
            return a == b and 0 < int(b) < n  # type: ignore[call-overload]

        await wait_for(upstream_blocked, 20, "the upstream to be held back by the slow client")
        async with system.http().ws_connect(wss, headers=system.auth()) as fast:
            t0 = time.monotonic()
            for i in range(50):
                await fast.send_str(f"m{i}")
                assert (await receive(fast, 5)).data == f"m{i}"
            async with system.http().get(edge + "/bytes/100000", headers=system.auth()) as r:
                assert r.status == 200 and len(await r.read()) == 100000
            assert time.monotonic() - t0 < 5, "a slow WebSocket reader held back the others"
            assert 'edge_websockets_open{pool="default"} 2.0' in await metrics(system, edge)
        # Nothing was lost on the slow one.
        expected = bytes(i % 251 for i in range(size))
        for _ in range(n):
            msg = await receive(slow, 30)
            assert msg.data == expected


async def test_crashes_close_the_client_promptly(system: System) -> None:
    _, up = await system.upstream()
    _, edge = await system.edge("edge", None, "--dead-after", "2")
    agent = system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    wss = edge + "/ws"
    # the upstream dies: the client gets 1011 promptly
    async with system.http().ws_connect(wss, headers=system.auth()) as ws:
        await ws.send_str("crash")
        t0 = time.monotonic()
        msg = await receive(ws, 10)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1011, msg
        assert time.monotonic() - t0 < 3
    _, up2 = await system.upstream("upstream2")
    agent.kill()
    agent2 = system.agent("w2", edge, up2)
    await system.wait_available(edge, ["w2"])
    # the agent stops answering (a dead tunnel): 1011 within the heartbeat deadline
    async with system.http().ws_connect(wss, headers=system.auth()) as ws:
        await ws.send_str("x")
        await receive(ws)
        agent2.signal(signal.SIGSTOP)
        t0 = time.monotonic()
        msg = await receive(ws, 15)
        took = time.monotonic() - t0
        agent2.signal(signal.SIGCONT)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1011, msg
        assert took < 2 + 2, took
    await system.wait_available(edge, ["w2"])
    # the agent is killed: 1011 at once
    async with system.http().ws_connect(wss, headers=system.auth()) as ws:
        await ws.send_str("x")
        await receive(ws)
        agent2.kill()
        t0 = time.monotonic()
        msg = await receive(ws, 10)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1011, msg
        assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("kind", ["tunnel", "direct"])
async def test_client_disconnect_idle_timeout_and_drain(system: System, kind: str) -> None:
    edge_proc_up, up = await system.upstream()
    direct = ["--direct", f"default={up},id=w1,capacity=8"] if kind == "direct" else []
    edge_proc, edge = await system.edge("edge", None, "--ws-idle-timeout", "1.5", *direct)
    if kind == "tunnel":
        system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    wss = edge + "/ws"
    # a client that vanishes: the upstream's WebSocket is closed
    ws = await system.http().ws_connect(wss, headers=system.auth())
    await ws.send_str("x")
    await receive(ws)
    assert ws._response.connection is not None
    ws._response.connection.transport.abort()  # type: ignore[union-attr]

    async def upstream_idle() -> bool:
        return (await upstream_ws_stats(system, up))["open"] == 0

    await wait_for(upstream_idle, 10, "the upstream WebSocket to close after the client vanished")
    # idle: no message either way for 1.5 s -> 1001
    async with system.http().ws_connect(wss, headers=system.auth()) as ws:
        t0 = time.monotonic()
        msg = await receive(ws, 10)
        assert msg.type is aiohttp.WSMsgType.CLOSE and (msg.data, msg.extra) == (1001, "idle timeout"), msg
        assert 1.2 < time.monotonic() - t0 < 5
    # a client that stops reading while the upstream sends: the idle timeout
    # still ends it (the close cannot be delivered: the connection is dropped),
    # and the slot, the stream and the upstream's WebSocket are freed
    stuck = await system.http().ws_connect(wss, headers=system.auth())
    for _ in range(40):
        await stuck.send_str(f"big:{1024 * 1024}")

    async def all_closed() -> bool:
        text = await metrics(system, edge)
        return ('edge_websockets_open{pool="default"} 0.0' in text
                and (await upstream_ws_stats(system, up))["open"] == 0)

    await wait_for(all_closed, 30, "a stuck client's WebSocket to be closed at both ends")
    await stuck.close()
    # drain: open WebSockets get 1001 once the grace period (3 s) is over
    async with system.http().ws_connect(wss, headers=system.auth()) as ws:
        await ws.send_str("x")
        await receive(ws)
        edge_proc.signal(signal.SIGTERM)
        t0 = time.monotonic()
        got = None
        while time.monotonic() - t0 < 10:
            try:
                await ws.send_str("keep busy")  # stay under the idle timeout
            except aiohttp.ClientConnectionResetError:
                pass  # the close is on its way
            msg = await receive(ws, 1)
            if msg.type is not aiohttp.WSMsgType.TEXT:
                got = msg
                break
            await asyncio.sleep(0.3)
        assert got is not None and (got.data, got.extra) == (1001, "edge shutting down"), (got, system.logs())
        assert 2.5 < time.monotonic() - t0 < 8


async def test_slow_upstream_reader_holds_back_only_its_own_stream(system: System) -> None:
    edge, up = await start(system)
    wss = edge + "/ws"
    size = 1024 * 1024
    async with system.http().ws_connect(wss, headers=system.auth(), max_msg_size=4 * size) as slow:
        await slow.send_str("slow:300")  # the upstream now reads one message per 300 ms
        payloads = [bytes([i]) * size for i in range(12)]
        for p in payloads:
            await slow.send_bytes(p)
        async with system.http().ws_connect(wss, headers=system.auth()) as fast:
            t0 = time.monotonic()
            for i in range(50):
                await fast.send_str(f"m{i}")
                assert (await receive(fast, 5)).data == f"m{i}"
            assert time.monotonic() - t0 < 5, "a slow upstream reader held back another WebSocket"
        for p in payloads:
            assert (await receive(slow, 30)).data == p


async def test_agent_drain_closes_websockets_with_1001(system: System) -> None:
    _, up = await system.upstream()
    _, edge = await system.edge("edge")
    agent = system.agent("w1", edge, up, "--grace", "1")
    await system.wait_available(edge, ["w1"])
    async with system.http().ws_connect(edge + "/ws", headers=system.auth()) as ws:
        await ws.send_str("x")
        await receive(ws)
        agent.signal(signal.SIGTERM)
        msg = await receive(ws, 15)
        assert msg.type is aiohttp.WSMsgType.CLOSE and (msg.data, msg.extra) == (1001, "worker shutting down"), msg

    async def upstream_saw_1001() -> bool:
        return [1001, ""] in (await upstream_ws_stats(system, up))["closes"]  # type: ignore[operator]

    await wait_for(upstream_saw_1001, 10, "the upstream to see close 1001")
