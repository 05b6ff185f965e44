"""Direct workers (`edge-proxy serve --direct`, issue 20) with real processes:
the edge dials each upstream itself over HTTP, and the workers get what
tunnel workers get: balancing beside tunnel workers, health checks that
move traffic within the deadline, retries before the first byte, ejection
with its cap, busy answers retried elsewhere, WebSockets, Server-Timing,
the workers page, and a --directs file reloaded on SIGHUP."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from httpcontract.timing import parse as parse_timing
from tests.harness import Proc, System, free_port, wait_for
from tests.relay.test_overload import _hold_one_slot, metrics_text, total


def direct(pool: str, url: str, name: str, *opts: str) -> list[str]:
    return ["--direct", ",".join([f"{pool}={url}", f"id={name}", *opts])]


async def pid_of(system: System, upstream: str) -> str:
    async with system.http().get(upstream + "/") as r:
        return r.headers["X-Upstream-Pid"]


async def test_direct_worker_serves_get_post_large_bodies_and_streams_with_upstream_timing(system: System):
    _, up = await system.upstream("up")
    _, edge = await system.edge("edge", None, *direct("default", up, "d1"))
    await system.wait_available(edge, ["d1"])
    http = system.http()
    async with http.get(edge + "/?q=1", headers=system.auth()) as r:
        text = await r.text()
        assert r.status == 200, text
        assert f"host 127.0.0.1:{edge.rsplit(':', 1)[1]}" in text  # the client's Host, as through a tunnel
        timing = parse_timing(r.headers.getall("Server-Timing"))
        assert {"lb", "upstream", "edge"} <= set(timing) and "tunnel" not in timing, timing
        assert timing["upstream"] <= timing["edge"]
    body = os.urandom(3 * 1024 * 1024)  # larger than --replay-buffer and --buffer-response
    async with http.post(edge + "/echo", data=body, headers=system.auth()) as r:
        got = await r.read()
        assert r.status == 200 and got == body
        assert r.headers["X-Sha256"] == hashlib.sha256(body).hexdigest()
        assert r.headers["X-Seen-Authorization"] == ""  # the client's key never reaches the worker
        assert r.headers["X-Seen-Request-Id"]  # the edge's request id
        assert "app" in parse_timing(r.headers.getall("Server-Timing"))  # the worker's own entries pass

    async def chunked():  # type: ignore[no-untyped-def]
        for _ in range(4):
            yield os.urandom(100_000)

    async with http.post(edge + "/echo", data=chunked(), headers=system.auth()) as r:
        assert r.status == 200 and len(await r.read()) == 400_000
    async with http.get(edge + "/bytes/5000000", headers=system.auth()) as r:  # streamed, not buffered
        data = await r.read()
        assert r.status == 200 and data == bytes(i % 251 for i in range(5_000_000))
    async with http.head(edge + "/bytes/1000", headers=system.auth()) as r:
        assert r.status == 200 and r.headers["Content-Length"] == "1000" and await r.read() == b""
    async with http.get(edge + "/pools/default/bytes/10", headers=system.auth()) as r:  # the pool prefix
        assert r.status == 200 and len(await r.read()) == 10
    async with http.get(edge + "/sse", headers=system.auth()) as r:
        first = await asyncio.wait_for(r.content.readline(), 5)  # before the upstream finishes
        assert first.startswith(b"data:"), first
        async with http.get(up + "/sse-release"):
            pass
    ws = await system.workers(edge)
    assert ws["d1"]["kind"] == "direct" and ws["d1"]["url"] == up and ws["d1"]["pool"] == "default"
    assert "tunnels" not in ws["d1"] and "tunnel_rtt_ms" not in ws["d1"], ws["d1"]
    assert ws["d1"]["served"] >= 4 and ws["d1"]["in_flight"] == 0


async def test_mixed_pool_balances_a_tunnel_worker_and_a_direct_worker(system: System):
    _, up1 = await system.upstream("up1")
    _, up2 = await system.upstream("up2")
    _, edge = await system.edge("edge", None, *direct("default", up2, "d1", "capacity=8"))
    system.agent("t1", edge, up1)
    await system.wait_available(edge, ["t1", "d1"])
    pids = {await pid_of(system, up1): "t1", await pid_of(system, up2): "d1"}
    http = system.http()

    async def get() -> str:
        async with http.get(edge + "/work?ms=30", headers=system.auth()) as r:
            assert r.status == 200
            return pids[await r.text()]

    seen = Counter(await asyncio.gather(*(get() for _ in range(40))))
    assert seen["t1"] >= 5 and seen["d1"] >= 5, seen
    ws = await system.workers(edge)
    assert (ws["t1"]["kind"], ws["d1"]["kind"]) == ("tunnel", "direct")
    text = await metrics_text(system, edge)
    assert 'edge_workers{pool="default",state="healthy"} 2.0' in text, text
    assert 'edge_worker_info{kind="direct",pool="default",worker="d1"} 1.0' in text, text
    assert 'edge_worker_info{kind="tunnel",pool="default",worker="t1"} 1.0' in text, text
    assert "edge_tunnels 1.0" in text, text  # the direct worker is no tunnel
    # The inspector lists both, and counts the direct one apart from the tunnels.
    async with system.http().get(edge + "/_edge/api/overview", headers=system.auth()) as r:
        view = await r.json()
    assert view["edge"]["tunnels"] == 1 and view["edge"]["direct"] == 1, view["edge"]
    kinds = {w["id"]: (w["kind"], w.get("url")) for w in view["workers"]}
    assert kinds == {"t1": ("tunnel", None), "d1": ("direct", up2)}, kinds
    # The inspector's own requests list names the worker that answered.
    async with system.http().get(edge + "/_edge/api/requests?worker=d1", headers=system.auth()) as r:
        assert r.status == 200
        listed = await r.json()
    assert any(q.get("worker") == "d1" for q in listed.get("requests", [])), listed


async def test_killed_direct_worker_is_down_within_the_health_deadline_and_traffic_moves(system: System):
    _, up1 = await system.upstream("up1")
    p2, up2 = await system.upstream("up2")
    # deadline: interval x unhealthy threshold + timeout = 0.5 x 2 + 1 (+ 10 % jitter)
    edge_proc, edge = await system.edge("edge", None, *direct("default", up1, "d1"), *direct("default", up2, "d2"))
    await system.wait_available(edge, ["d1", "d2"])
    p2.kill()
    t0 = time.monotonic()

    async def down() -> bool:
        return not (await system.workers(edge))["d2"]["available"]

    await wait_for(down, 10, "d2 to be marked down")
    assert time.monotonic() - t0 < 0.55 * 2 + 1.0 + 0.5, "later than the health deadline"
    http = system.http()
    for _ in range(10):
        async with http.post(edge + "/echo", data=b"x", headers=system.auth()) as r:
            assert r.status == 200
    ws = await system.workers(edge)
    assert "cannot connect" in str(ws["d2"]["last_check_error"]), ws["d2"]
    assert "direct worker d2 active check: UNHEALTHY" in edge_proc.log()


async def test_direct_worker_down_at_start_is_unavailable_not_a_start_up_failure(system: System):
    dead = f"http://127.0.0.1:{free_port()}"
    edge_proc, edge = await system.edge("edge", None, *direct("default", dead, "d1"))

    async def checked() -> bool:
        return bool((await system.workers(edge))["d1"]["last_check_error"])

    await wait_for(checked, 10, "the first check of d1")
    t0 = time.monotonic()
    async with system.http().get(edge + "/", headers=system.auth()) as r:
        body = await r.json()
        assert r.status == 503 and body["code"] == "no_worker" and r.headers["Retry-After"], body
    assert time.monotonic() - t0 < 1.0  # fast: no queueing for a pool with nobody available
    assert "direct worker d1 (pool default" in edge_proc.log() and "is not answering" in edge_proc.log()
    # It joins when it comes up.
    port = int(dead.rsplit(":", 1)[1])
    await system.upstream("late", port)
    await system.wait_available(edge, ["d1"])


async def test_connect_refused_is_retried_on_another_worker_even_for_post(system: System):
    p1, up1 = await system.upstream("up1")
    _, up2 = await system.upstream("up2")
    _, edge = await system.edge("edge", None, "--check-interval", "30", *direct("default", up1, "d1"),
                                *direct("default", up2, "d2"))
    await system.wait_available(edge, ["d1", "d2"])
    p1.kill()  # d1 refuses connections; no check has noticed yet
    http = system.http()
    for _ in range(10):
        async with http.post(edge + "/echo", data=b"payload", headers=system.auth()) as r:
            assert r.status == 200 and await r.read() == b"payload"
    text = await metrics_text(system, edge)
    assert total(text, "edge_retries_total") >= 1, text
    assert total(text, 'edge_direct_connect_failures_total{pool="default"}') >= 1, text
    # Refused connections count as failed checks: d1 is down without waiting 30 s.
    assert not (await system.workers(edge))["d1"]["available"]


async def test_connection_lost_before_the_answer_is_retried_elsewhere_only_for_idempotent_methods(system: System):
    _, up1 = await system.upstream("up1")
    _, up2 = await system.upstream("up2")
    # Room on both, so that a retry always finds a free slot on the other.
    _, edge = await system.edge("edge", None, "--consecutive-failures", "100",
                                *direct("default", up1, "d1", "capacity=16"), *direct("default", up2, "d2", "capacity=16"))
    await system.wait_available(edge, ["d1", "d2"])
    survivor = await pid_of(system, up2)  # d1 closes every such connection without answering
    http = system.http()

    async def send(method: str) -> tuple[int, str]:
        async with http.request(method, edge + f"/drop-unless/{survivor}", data=b"x", headers=system.auth()) as r:
            body = await r.read()
            return r.status, (r.headers.get("X-Upstream-Pid", "") if r.status == 200 else body.decode())

    gets = await asyncio.gather(*(send("GET") for _ in range(12)))
    assert all(st == 200 and pid == survivor for st, pid in gets), gets
    posts = await asyncio.gather(*(send("POST") for _ in range(12)))
    failed = [body for st, body in posts if st != 200]
    # A POST may have been processed: never sent twice, 502 worker_failed instead.
    assert failed and all('"worker_failed"' in b for b in failed), posts
    assert all(st in (200, 502) for st, _ in posts), posts
    text = await metrics_text(system, edge)
    assert total(text, "edge_retries_total") >= 1, text


async def test_connect_refused_with_no_other_worker_is_502_worker_unavailable(system: System):
    p1, up1 = await system.upstream("up1")
    _, edge = await system.edge("edge", None, "--check-interval", "30", *direct("default", up1, "d1"))
    await system.wait_available(edge, ["d1"])
    p1.kill()
    async with system.http().get(edge + "/", headers=system.auth()) as r:
        body = await r.json()
        assert r.status == 502 and body["code"] == "worker_unavailable", body
        assert r.headers["Content-Type"].startswith("application/problem+json")


async def test_hanging_direct_worker_is_504_upstream_timeout(system: System):
    _, up = await system.upstream("up")
    _, edge = await system.edge("edge", None, "--upstream-timeout", "1", *direct("default", up, "d1"))
    await system.wait_available(edge, ["d1"])
    t0 = time.monotonic()
    async with system.http().get(edge + "/hang", headers=system.auth()) as r:
        body = await r.json()
        assert r.status == 504 and body["code"] == "upstream_timeout", body
    assert time.monotonic() - t0 < 3
    assert (await system.workers(edge))["d1"]["in_flight"] == 0


async def test_direct_worker_answering_500_is_ejected_and_the_cap_keeps_the_last(system: System):
    _, good = await system.upstream("good")
    _, bad = await system.upstream("bad")
    _, bad2 = await system.upstream("bad2")
    edge_proc, edge = await system.edge("edge", None, "--consecutive-failures", "3", "--base-ejection-time", "30",
                                        *direct("default", good, "good"), *direct("default", bad, "bad"),
                                        *direct("default", bad2, "bad2"))
    await system.wait_available(edge, ["good", "bad", "bad2"])
    http = system.http()
    for up in (bad, bad2):
        async with http.get(up + "/set-fail/on") as r:
            assert r.status == 200

    async def get() -> int:
        async with http.get(edge + "/", headers=system.auth()) as r:
            return r.status

    statuses: list[int] = []
    for _ in range(15):
        statuses += await asyncio.gather(*(get() for _ in range(6)))
    ws = await system.workers(edge)
    ejected = [n for n in ("bad", "bad2") if ws[n]["health"] == "ejected"]
    # 10 % of three workers: one ejection allowed, the other failing one is capped.
    assert len(ejected) == 1, (ejected, ws)
    text = await metrics_text(system, edge)
    assert total(text, "edge_ejections_total") == 1 and total(text, "edge_ejections_capped_total") >= 1, text
    assert "not ejected" in edge_proc.log() and "--max-ejection-percent" in edge_proc.log()


async def test_busy_direct_worker_answer_is_retried_on_another_worker(system: System):
    _, up1 = await system.upstream("up1")
    _, up2 = await system.upstream("up2")
    _, edge = await system.edge("edge", None, *direct("default", up1, "d1"), *direct("default", up2, "d2"))
    await system.wait_available(edge, ["d1", "d2"])
    hold = await _hold_one_slot(system, up1)
    http = system.http()
    bodies = [os.urandom(100_000) for _ in range(4)]

    async def post(b: bytes) -> tuple[int, bytes]:
        async with http.post(edge + "/echo", data=b, headers=system.auth()) as r:
            return r.status, await r.read()

    results = await asyncio.gather(*(post(b) for b in bodies))
    assert results == [(200, b) for b in bodies]
    text = await metrics_text(system, edge)
    assert total(text, 'edge_upstream_shed_total{handling="retried",pool="default"}') >= 1, text
    assert total(text, "edge_ejections_total") == 0
    ws = await system.workers(edge)
    assert ws["d1"]["shed"] >= 1 and ws["d1"]["errors"] == 0 and ws["d1"]["in_flight"] == 0, ws["d1"]
    hold.cancel()


def test_bad_direct_declarations_are_one_line_start_up_errors(pki, tmp_path: Path):
    base = [sys.executable, "-m", "edge_proxy", "serve", "--client-keys", str(pki.client_keys), "--worker-tokens",
            str(pki.worker_tokens), "--cert", str(pki.cert), "--key", str(pki.key), "--listen",
            f"127.0.0.1:{free_port()}"]
    bad_file = tmp_path / "directs"
    bad_file.write_text("# workers\ndefault=http://10.77.0.2:8000,id=w1\n\ngpu=https://10.77.0.3:8000\n")
    for args, words in [
        (["--direct", "default=10.77.0.2:8000"], ["--direct", "http://", "POOL=URL"]),
        (["--direct", "default=http://10.77.0.2"], ["host and a port"]),
        (["--direct", "default=http://10.77.0.2:8000/v1"], ["no", "path"]),
        (["--direct", "default=http://10.77.0.2:8000,capacity=0"], ["capacity"]),
        (["--direct", "default=http://10.77.0.2:8000,weight=2"], ["unknown option 'weight=2'"]),
        (["--directs", str(bad_file)], [f"{bad_file} line 4", "https:// is not supported"]),
        (["--directs", str(tmp_path / "missing")], ["cannot read --directs file"]),
        (["--direct", "a=http://10.0.0.1:1,id=x", "--direct", "a=http://10.0.0.2:1,id=x"], ["declared twice"]),
    ]:
        r = subprocess.run(base + args, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert all(w in lines[0] for w in words), (words, lines[0])


async def test_directs_file_is_reloaded_on_sighup(system: System, tmp_path: Path):
    _, up1 = await system.upstream("up1")
    _, up2 = await system.upstream("up2")
    listing = tmp_path / "directs"
    listing.write_text(f"# the VPN workers\ndefault={up1},id=d1\n")
    edge_proc, edge = await system.edge("edge", None, "--directs", str(listing))
    await system.wait_available(edge, ["d1"])
    # As `edge-proxy vpn init` prints them, pasted as they are.
    listing.write_text(f"--direct default={up2},id=d2,capacity=2\n")
    edge_proc.signal(signal.SIGHUP)

    async def swapped() -> bool:
        ws = await system.workers(edge)
        return "d1" not in ws and "d2" in ws and bool(ws["d2"]["available"])

    await wait_for(swapped, 10, lambda: f"d1 out and d2 in\n{edge_proc.log()}")
    assert (await system.workers(edge))["d2"]["capacity"] == 2
    async with system.http().get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200 and r.headers["X-Upstream-Pid"] == await pid_of(system, up2)
    # A bad file changes nothing, and says so in one line.
    listing.write_text("default=ftp://nowhere\n")
    edge_proc.signal(signal.SIGHUP)
    await wait_for(lambda: _logged(edge_proc, "not reloaded"), 10, "the reload to be refused")
    assert "d2" in await system.workers(edge)
    assert "SIGHUP: direct workers reloaded" in edge_proc.log()


async def _logged(proc: Proc, text: str) -> bool:
    return text in proc.log()


async def test_a_capacity_change_on_sighup_keeps_a_failing_worker_out(system: System, tmp_path: Path):
    # Its checks fail (404 at /healthz): it never takes traffic.
    _, up = await system.upstream("up", health_path="/elsewhere")
    listing = tmp_path / "directs"
    listing.write_text(f"default={up},id=d1,capacity=2\n")
    edge_proc, edge = await system.edge("edge", None, "--directs", str(listing))

    async def checked_and_failing() -> bool:
        w = (await system.workers(edge)).get("d1", {})
        return "404" in str(w.get("health_detail", ""))

    await wait_for(checked_and_failing, 10, lambda: f"d1's checks to fail\n{edge_proc.log()}")
    listing.write_text(f"default={up},id=d1,capacity=3\n")
    edge_proc.signal(signal.SIGHUP)
    await wait_for(lambda: _logged(edge_proc, "SIGHUP: direct workers reloaded"), 10, "the reload")
    # Only the capacity changed: what the checks said still holds. (A fresh
    # health state would let it in until two more checks failed.)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        w = (await system.workers(edge))["d1"]
        assert not w["available"] and w["capacity"] == 3, w
        await asyncio.sleep(0.05)
