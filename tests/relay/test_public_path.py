"""--public-path: a page a browser opens through the edge before it can
present a key (the inference server's /live), proxied without one; nothing
else is (other methods, other spellings, WebSocket upgrades)."""

from __future__ import annotations

import os
import subprocess

import aiohttp
from yarl import URL

from edge_proxy.routing import is_public_page
from tests.harness import PY, ROOT, System


def test_only_plain_get_and_head_of_a_listed_path_are_public() -> None:
    public = ["/live", "/stats"]
    assert is_public_page("GET", "/live", public)
    assert is_public_page("HEAD", "/live?x=1", public)
    assert not is_public_page("GET", "/live", [])
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        assert not is_public_page(method, "/live", public)
    for target in ("/live/", "/livex", "/x/../live", "//live", "/./live", "/%6Cive", "/stream", "/"):
        assert not is_public_page("GET", target, public), target


async def test_a_public_path_needs_no_key_and_nothing_else_changes(system: System) -> None:
    _, up = await system.upstream()
    _, edge = await system.edge("edge", None, "--public-path", "/stats", "--public-path", "/ws")
    system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    http = system.http()
    for path in ("/stats", "/stats?x=1", "/pools/default/stats"):
        async with http.get(edge + path) as r:
            assert r.status == 200, (path, r.status, await r.text())
            assert "requests" in await r.text() or r.content_type == "application/json"
    for method, path in (("GET", "/"), ("POST", "/stats"), ("GET", "/./stats"), ("GET", "//stats"),
                         ("GET", "/%73tats"), ("GET", "/pools/default/../stats/..")):
        async with http.request(method, URL(edge + path, encoded=True)) as r:  # sent as spelled
            assert r.status == 401, (method, path, r.status)
    # A WebSocket upgrade always needs a key, even on a public path.
    try:
        async with http.ws_connect(edge + "/ws"):
            raise AssertionError("upgrade without a key accepted")
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 401
    async with http.ws_connect(edge + "/ws", headers=system.auth()) as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=10)).data == "hi"


async def test_without_the_option_every_proxied_path_needs_a_key(system: System) -> None:
    _, up = await system.upstream()
    _, edge = await system.edge()
    system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    async with system.http().get(edge + "/stats") as r:
        assert r.status == 401


def test_a_bad_public_path_is_a_one_line_start_up_error() -> None:
    for bad, env in (("live", False), ("/_edge/workers", False), ("/live?x=1", True)):
        args = [PY, "-m", "edge_proxy", "serve"] + ([] if env else ["--public-path", bad])
        r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "EDGE_PUBLIC_PATH": bad} if env else None)
        assert r.returncode == 2, (bad, r.stderr)
        assert "public" in r.stderr.lower() and repr(bad) in r.stderr and "Traceback" not in r.stderr, r.stderr
