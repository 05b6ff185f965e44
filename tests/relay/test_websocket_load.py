"""An upstream that refuses WebSocket upgrades because it is busy (503 +
Retry-After, as the inference server's /stream does while its model loads)
is load, not failure: the client gets the 503 with its Retry-After, and the
worker is never ejected for it, as for HTTP (DESIGN: "An upstream's 503/429
with Retry-After is load, not failure")."""

from __future__ import annotations

import aiohttp

from tests.harness import System


async def test_busy_refusals_of_upgrades_pass_retry_after_and_eject_nobody(system: System) -> None:
    _, up = await system.upstream()
    # --shed-recovery-time 0: the edge does not lower w1's capacity when it
    # sheds, so every upgrade below reaches the busy upstream.
    _, edge = await system.edge("edge", None, "--shed-recovery-time", "0")
    system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    http = system.http()
    async with http.get(up + "/set-shed/1") as r:  # the upstream takes one request at a time
        assert r.status == 200
    async with http.ws_connect(edge + "/ws", headers=system.auth()) as held:  # ... and this one holds it
        await held.send_str("hi")
        assert (await held.receive(timeout=10)).data == "hi"
        refusals = 8  # more than --consecutive-failures (5): failures would eject w1
        for _ in range(refusals):
            try:
                async with http.ws_connect(edge + "/ws", headers=system.auth()):
                    raise AssertionError("a busy upstream accepted the upgrade")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 503, exc
                assert exc.headers is not None and exc.headers.get("Retry-After") == "1", exc.headers
        w1 = (await system.workers(edge))["w1"]
        # Counted as shed, never as errors towards ejection (a lone worker is
        # never ejected, the cap says so: ejections_capped would count it).
        assert w1["available"] and w1["shed"] >= refusals, w1
        assert w1["errors"] == 0 and w1["ejections"] == 0 and w1["ejections_capped"] == 0, w1
    async with http.get(up + "/set-shed/0") as r:
        assert r.status == 200
    async with http.ws_connect(edge + "/ws", headers=system.auth()) as ws:
        await ws.send_str("again")
        assert (await ws.receive(timeout=10)).data == "again"
