import hashlib
import os

from tests.harness import System


async def test_get_and_1mb_post_through_edge_and_agent_are_byte_exact(system: System):
    _, up = await system.upstream()
    _, edge = await system.edge()
    system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    http = system.http()
    async with http.get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200
        text = await r.text()
        assert text.startswith("hello from")
        timing = r.headers["Server-Timing"]
        for hop in ("upstream", "agent", "lb", "tunnel", "edge"):
            assert f"{hop};dur=" in timing
        assert r.headers["X-Request-ID"]
    body = os.urandom(1024 * 1024)
    async with http.post(edge + "/echo", data=body, headers=system.auth()) as r:
        assert r.status == 200
        got = await r.read()
    assert got == body
    assert r.headers["X-Sha256"] == hashlib.sha256(body).hexdigest()
    # The client's credentials never reach the worker; the edge sets X-Forwarded-For.
    assert r.headers["X-Seen-Authorization"] == ""
    assert r.headers["X-Seen-Forwarded-For"] == "127.0.0.1"
