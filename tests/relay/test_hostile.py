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
