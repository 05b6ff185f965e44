"""Hostile input at the edge: each case gets a clear 4xx or a closed
connection, and the edge keeps serving everyone else."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from tests.harness import System


async def raw_exchange(system: System, edge: str, payload: bytes, timeout: float = 10) -> bytes:
    host, port = edge.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=str(system.pki.ca))
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname="localhost")
    writer.write(payload)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), timeout)
    finally:
        writer.close()


@pytest.fixture
async def stack(system: System):
    _, up = await system.upstream()
    _, edge = await system.edge()
    system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    return up, edge


async def test_absolute_form_and_connect_are_refused_never_proxied(system: System, stack):
    _, edge = stack
    key = system.pki.client_key
    for line in (b"GET http://169.254.169.254/latest/meta-data HTTP/1.1", b"CONNECT example.com:443 HTTP/1.1"):
        reply = await raw_exchange(system, edge, line + b"\r\nHost: example.com\r\nAuthorization: Bearer " +
                                   key.encode() + b"\r\nConnection: close\r\n\r\n")
        status = reply.split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1.1 4"), reply[:200]
    async with system.http().get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200


async def test_forwarded_headers_are_set_by_the_edge_not_the_client(system: System, stack):
    _, edge = stack
    spoof = {"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6", "Forwarded": "for=6.6.6.6", **system.auth()}
    async with system.http().post(edge + "/echo", data=b"x", headers=spoof) as r:
        assert r.status == 200
        assert r.headers["X-Seen-Forwarded-For"] == "127.0.0.1"


async def test_client_request_id_is_propagated_only_when_well_formed(system: System, stack):
    _, edge = stack
    async with system.http().post(edge + "/echo", data=b"x", headers={"X-Request-ID": "abc-123", **system.auth()}) as r:
        assert r.headers["X-Request-ID"] == "abc-123" == r.headers["X-Seen-Request-Id"]
    async with system.http().post(edge + "/echo", data=b"x",
                                  headers={"X-Request-ID": "bad id\twith junk" * 20, **system.auth()}) as r:
        rid = r.headers["X-Request-ID"]
        assert rid != "bad id" and rid == r.headers["X-Seen-Request-Id"] and len(rid) == 32


async def test_huge_declared_body_is_413_without_reading_it(system: System, stack):
    _, edge = stack
    head = (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10737418240\r\nAuthorization: Bearer " +
            system.pki.client_key.encode() + b"\r\n\r\n")
    reply = await raw_exchange(system, edge, head + b"only a little")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


async def test_worker_token_at_the_proxy_and_client_key_at_the_tunnel_are_401(system: System, stack):
    _, edge = stack
    async with system.http().get(edge + "/", headers={"X-API-Key": system.pki.worker_token}) as r:
        assert r.status == 401
    async with system.http().get(edge + "/_edge/tunnel", headers=system.auth()) as r:
        assert r.status == 401


async def test_slowloris_headers_are_cut_at_the_keepalive_timeout(system: System):
    _, edge = await system.edge("edge", None, "--keepalive-timeout", "1")
    host, port = edge.removeprefix("https://").split(":")
    ctx = ssl.create_default_context(cafile=str(system.pki.ca))
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname="localhost")
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    closed = False
    for _ in range(40):  # keep trickling a header byte every 0.1 s; the edge must hang up
        try:
            writer.write(b"X")
            await writer.drain()
            if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                closed = True
                break
        except TimeoutError:
            continue
        except (ConnectionError, ssl.SSLError):
            closed = True
            break
    writer.close()
    assert closed, "the edge kept a never-ending request head open for 4 s with a 1 s timeout"


async def test_stalled_request_body_gets_408_and_frees_the_worker_slot(system: System):
    _, up = await system.upstream()
    _, edge = await system.edge("edge", None, "--client-body-timeout", "1")
    system.agent("w1", edge, up, capacity=1)
    await system.wait_available(edge, ["w1"])
    head = (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nAuthorization: Bearer " +
            system.pki.client_key.encode() + b"\r\n\r\n")
    reply = await raw_exchange(system, edge, head + b"only 20 bytes, then.", timeout=10)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    async with system.http().get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200  # capacity 1: the slot came back


async def test_oversized_and_too_many_headers_and_smuggling_are_400(system: System, stack):
    _, edge = stack
    auth_line = b"Authorization: Bearer " + system.pki.client_key.encode() + b"\r\n"
    cases = {
        "oversized header": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n" + auth_line + b"\r\n",
        "too many headers": b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(300))
        + auth_line + b"\r\n",
        "CL and TE": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n" + auth_line
        + b"\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n" + auth_line + b"\r\n",
    }
    for name, raw in cases.items():
        reply = await raw_exchange(system, edge, raw)
        status = reply.split(b" ", 2)[1] if reply.startswith(b"HTTP/1.") else b""
        assert status.startswith(b"4"), (name, reply[:200])
        assert b"/smuggled" not in reply
    async with system.http().get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200


async def test_websocket_upgrade_on_a_proxied_path_never_reaches_a_tunnel(system: System, stack):
    _, edge = stack
    from tunnel import Hello
    from tunnel.frames import FrameType, encode_frame

    fake_frames = encode_frame(FrameType.HELLO, 0, Hello("intruder").encode()) + encode_frame(FrameType.DATA, 1, b"x")
    # A masked binary WebSocket frame (16-bit length, zero mask key) carrying tunnel frames.
    ws_frame = b"\x82\xfe" + len(fake_frames).to_bytes(2, "big") + b"\x00\x00\x00\x00" + fake_frames
    head = (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer " +
            system.pki.client_key.encode() + b"\r\n\r\n")
    reply = await raw_exchange(system, edge, head + ws_frame)
    assert not reply.startswith(b"HTTP/1.1 101"), reply[:200]
    workers = await system.workers(edge)
    assert set(workers) == {"w1"} and workers["w1"]["available"]
    async with system.http().get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200


async def test_non_utf8_header_bytes_are_handled(system: System, stack):
    _, edge = stack
    raw = (b"GET / HTTP/1.1\r\nHost: x\r\nX-Odd: caf\xe9 \xff\xfe\r\nAuthorization: Bearer " +
           system.pki.client_key.encode() + b"\r\nConnection: close\r\n\r\n")
    reply = await raw_exchange(system, edge, raw)
    status = reply.split(b" ", 2)[1] if reply.startswith(b"HTTP/1.") else b""
    assert status in (b"200", b"400"), reply[:200]
    async with system.http().get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200


async def test_key_brute_force_is_rate_limited_per_address_and_logged(system: System, stack):
    _, edge = stack
    statuses = []
    for i in range(70):
        async with system.http().get(edge + "/", headers={"X-API-Key": f"eik_guess{i}"}) as r:
            statuses.append(r.status)
    assert set(statuses) <= {401, 429} and 429 in statuses
    edge_log = next(p for p in system.procs if p.name == "edge").log()
    assert "too many failed authentications" in edge_log


async def test_upstream_crash_mid_response_is_502_and_the_edge_keeps_serving(system: System):
    _, up1 = await system.upstream("up1")
    _, up2 = await system.upstream("up2")
    _, edge = await system.edge()
    system.agent("w1", edge, up1)
    system.agent("w2", edge, up2)
    await system.wait_available(edge, ["w1", "w2"])
    async with system.http().get(edge + "/crash", headers=system.auth()) as r:
        assert r.status == 502
    for _ in range(10):
        async with system.http().get(edge + "/", headers=system.auth()) as r:
            assert r.status == 200


async def test_request_head_larger_than_a_tunnel_frame_is_431(system: System, stack):
    _, edge = stack
    headers = {f"X-Pad-{i}": "p" * 1000 for i in range(90)}  # ~90 KB: within HTTP limits, over one 64 KiB frame
    async with system.http().get(edge + "/", headers={**headers, **system.auth()}) as r:
        assert r.status == 431
    async with system.http().get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200
