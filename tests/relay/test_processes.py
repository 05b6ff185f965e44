"""`edge-proxy serve --processes 2` as real processes: a supervisor, two edge
processes sharing the port, one agent holding a tunnel to each, one merged
picture, a child killed and restarted, SIGTERM draining everything."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from tests.harness import ROOT, System, free_port, wait_for
from tunnel import Connection, Hello, Role, WelcomeReceived, WorkerStatus


async def merged(system: System, edge: str) -> dict[str, Any]:
    async with system.http().get(edge + "/_edge/workers", headers=system.auth()) as r:
        assert r.status == 200
        return dict(await r.json())


def tunnels_by_process(data: dict[str, Any], worker: str) -> dict[str, Any]:
    ws = {w["id"]: w for w in data["workers"]}
    return dict(ws[worker]["processes"]) if worker in ws else {}


async def wait_both_held(system: System, edge: str, worker: str, timeout: float = 40) -> dict[str, Any]:
    """Until the merged view shows `worker` with a tunnel in service at both processes."""
    seen: dict[str, Any] = {}

    async def both() -> bool:
        nonlocal seen
        seen = await merged(system, edge)
        parts = tunnels_by_process(seen, worker)
        return set(parts) == {"0", "1"} and all(p["tunnels"] and p["available"] for p in parts.values())

    await wait_for(both, timeout, lambda: f"tunnels of {worker} at both processes: {seen}\n{system.logs()}")
    return seen


async def test_agent_reaches_both_processes_and_the_kernel_spreads_clients(system: System) -> None:
    _, up = await system.upstream()
    edge_proc, edge = await system.edge("edge", None, "--processes", "2")
    agent = system.agent("w1", edge, up)
    data = await wait_both_held(system, edge, "w1")
    assert [w["id"] for w in data["workers"]] == ["w1"]  # one worker, from both processes
    assert data["edge"]["processes"] == 2 and data["edge"]["missing"] == []
    w = data["workers"][0]
    assert w["capacity"] == 8  # as the agent announced; each process admits 4
    assert {p["capacity"] for p in w["processes"].values()} == {4}

    # Fresh connections each time, so the kernel picks a process for each.
    ctx = system.pki.client_ssl()
    statuses: list[int] = []

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.get(edge + "/", headers=system.auth()) as r:
            await r.read()
            statuses.append(r.status)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True, limit=8)) as s:
        await asyncio.gather(*(one(s) for _ in range(80)))
    assert statuses == [200] * 80
    parts = tunnels_by_process(await merged(system, edge), "w1")
    served = {p: parts[p]["served"] for p in parts}
    assert all(n > 0 for n in served.values()), served  # both processes carried requests
    assert sum(served.values()) >= 80
    async with system.http().get(edge + "/_edge/metrics", headers=system.auth()) as r:
        text = await r.text()
    assert 'edge_processes{state="answered"} 2.0' in text
    assert 'edge_requests_total{pool="default",status="200"}' in text  # counters of both processes, summed
    total = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith('edge_requests_total{pool="default",status="200"}'))
    assert total >= 80
    per_process = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("edge_process_requests{")}
    assert set(per_process) == {"0", "1"} and all(n > 0 for n in per_process.values()), per_process
    assert "tunnels to edge" in agent.log() and "processes 2/2" in agent.log()
    assert edge_proc.alive()


async def test_a_killed_process_is_restarted_and_the_agent_takes_its_tunnel_back(system: System) -> None:
    _, up = await system.upstream()
    edge_proc, edge = await system.edge("edge", None, "--processes", "2")
    agent = system.agent("w1", edge, up)
    data = await wait_both_held(system, edge, "w1")
    old_pid = tunnels_by_process(data, "w1")["1"]["pid"]
    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> bool:
        parts = tunnels_by_process(await merged(system, edge), "w1")
        return "1" in parts and parts["1"]["pid"] != old_pid and bool(parts["1"]["tunnels"])

    await wait_for(restarted, 60, lambda: f"process 1 restarted and re-held\n{system.logs()}")
    assert "edge process 1" in edge_proc.log() and "restarting it" in edge_proc.log()
    assert "(missing 1)" in agent.log()  # the agent noticed and took back only the missing index
    await wait_both_held(system, edge, "w1")
    async with system.http().get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200


async def test_sigterm_to_the_supervisor_drains_every_process_and_exits_0(system: System) -> None:
    _, up = await system.upstream()
    edge_proc, edge = await system.edge("edge", None, "--processes", "2")
    system.agent("w1", edge, up)
    data = await wait_both_held(system, edge, "w1")
    pids = [p["pid"] for p in tunnels_by_process(data, "w1").values()]
    # A slow request in flight while the edge is told to stop: it finishes (--grace 3).
    slow = asyncio.create_task(system.http().get(edge + "/work?ms=1500", headers=system.auth()))

    async def at_upstream() -> bool:
        async with system.http().get(up + "/stats") as r:
            return int((await r.json())["in_flight"]) >= 1

    await wait_for(at_upstream, 10, "the slow request at the upstream")
    edge_proc.signal(signal.SIGTERM)
    resp = await slow
    assert resp.status == 200
    resp.release()
    code = await asyncio.to_thread(edge_proc.p.wait, 30)
    assert code == 0, edge_proc.log()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"edge process {pid} outlived its supervisor")
    assert "all 2 edge processes stopped" in edge_proc.log()


def test_port_taken_is_one_line_and_exit_2(system: System, tmp_path: Any) -> None:
    port = free_port()
    pk = system.pki
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        r = subprocess.run([sys.executable, "-m", "edge_proxy", "serve", "--listen", f"127.0.0.1:{port}", "--cert",
                            str(pk.cert), "--key", str(pk.key), "--client-keys", str(pk.client_keys),
                            "--worker-tokens", str(pk.worker_tokens), "--processes", "2"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: port {port} on 127.0.0.1 is already in use; stop the other process or choose "
                      "another with --listen"], r.stderr




@pytest.mark.parametrize("processes", [1, 2])
async def test_an_agent_that_ignores_the_process_fields_is_in_service_at_once(system: System, processes: int) -> None:
    """An older agent (no `process_aware` in its HELLO, as every agent before
    --processes) sends no confirmation: its tunnel serves at once, as always.
    A process-aware one is held out of service until its first STATUS."""
    _, edge = await system.edge("edge", None, "--processes", str(processes))
    url = edge.replace("https://", "wss://") + "/_edge/tunnel"
    headers = {"Authorization": f"Bearer {system.pki.worker_token}"}
    ctx = system.pki.client_ssl()

    async def in_service(name: str) -> bool:
        w = (await system.workers(edge)).get(name)
        if w is None:
            return False
        parts = w.get("processes")
        return bool(w["available"]) if parts is None else any(p["available"] for p in parts.values())  # type: ignore[union-attr]

    async with connect(url, ssl=ctx, additional_headers=headers, ping_interval=None) as old:
        conn = Connection(Role.AGENT)
        conn.send_hello(Hello("old", capacity=2))
        await old.send(conn.data_to_send())
        (ev,) = conn.receive_data(await asyncio.wait_for(old.recv(), 5))
        assert isinstance(ev, WelcomeReceived)
        assert ev.welcome.processes == processes  # an old agent simply does not read it
        await wait_for(lambda: in_service("old"), 10, "the old agent's tunnel in service without a STATUS")

    if processes == 1:
        return
    async with connect(url, ssl=ctx, additional_headers=headers, ping_interval=None) as new:
        conn = Connection(Role.AGENT)
        conn.send_hello(Hello("aware", capacity=2, process_aware=True))
        await new.send(conn.data_to_send())
        (ev,) = conn.receive_data(await asyncio.wait_for(new.recv(), 5))
        assert isinstance(ev, WelcomeReceived)
        await wait_for(lambda: _registered(system, edge, "aware"), 10, "the aware agent registered")
        # Registered, so without the gate it would be in service already (it has a tunnel and no failed check).
        assert not await in_service("aware")
        conn.send_status(WorkerStatus(True))
        await new.send(conn.data_to_send())
        await wait_for(lambda: in_service("aware"), 10, "the aware agent in service after its STATUS")


async def _registered(system: System, edge: str, name: str) -> bool:
    return name in await system.workers(edge)


async def test_a_sibling_that_does_not_answer_is_reported_missing_not_waited_for(system: System) -> None:
    _, up = await system.upstream()
    _, edge = await system.edge("edge", None, "--processes", "2")
    system.agent("w1", edge, up)
    data = await wait_both_held(system, edge, "w1")
    pids = {int(k): int(p["pid"]) for k, p in tunnels_by_process(data, "w1").items()}
    os.kill(pids[1], signal.SIGSTOP)  # process 1 hangs: its socket accepts, nobody answers
    try:
        answer: dict[str, Any] = {}
        took = 0.0

        async def from_process_0() -> bool:
            nonlocal answer, took
            # A fresh connection each time: one the kernel gives to the stopped process times out.
            ctx = system.pki.client_ssl()
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True),
                                             timeout=aiohttp.ClientTimeout(total=4)) as s:
                t0 = asyncio.get_running_loop().time()
                async with s.get(edge + "/_edge/workers", headers=system.auth()) as r:
                    answer = await r.json()
                took = asyncio.get_running_loop().time() - t0
            return True

        await wait_for(from_process_0, 60, lambda: f"an answer from process 0: {answer}", interval=0.1)
        assert answer["edge"]["process"] == 0 and answer["edge"]["missing"] == [1]
        assert took < 3.0  # the sibling's 1 s timeout, not a hang
        parts = tunnels_by_process(answer, "w1")
        assert set(parts) == {"0"}  # what process 0 knows, and no more
    finally:
        os.kill(pids[1], signal.SIGCONT)


async def test_a_key_rate_is_shared_out_between_the_processes(system: System) -> None:
    """The `limited` key allows 5/s with a burst of 5: with 2 processes each
    keeps half (2.5 tokens, so 2 requests at once), so a burst of 12 requests
    spread over both gets about 4 through, not about 10."""
    _, up = await system.upstream()
    _, edge = await system.edge("edge", None, "--processes", "2")
    system.agent("w1", edge, up)
    await wait_both_held(system, edge, "w1")
    ctx = system.pki.client_ssl()
    statuses: list[int] = []

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.get(edge + "/", headers=system.auth(system.pki.limited_key)) as r:
            await r.read()
            statuses.append(r.status)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, force_close=True)) as s:
        await asyncio.gather(*(one(s) for _ in range(12)))
    assert set(statuses) <= {200, 429}
    assert 1 <= statuses.count(200) <= 6, statuses


async def test_direct_workers_are_dialled_by_every_process_and_reloaded_by_each_on_sighup(
        system: System, tmp_path: Path) -> None:
    _, up1 = await system.upstream("up1")
    _, up2 = await system.upstream("up2")
    listing = tmp_path / "directs"
    listing.write_text(f"default={up1},id=d1,capacity=5\n")
    edge_proc, edge = await system.edge("edge", None, "--processes", "2", "--directs", str(listing))
    seen: dict[str, Any] = {}

    async def at_both(worker: str, gone: str | None = None) -> bool:
        nonlocal seen
        seen = await merged(system, edge)
        parts = tunnels_by_process(seen, worker)
        ids = {w["id"] for w in seen["workers"]}
        return set(parts) == {"0", "1"} and all(p["available"] for p in parts.values()) and gone not in ids

    await wait_for(lambda: at_both("d1"), 20, lambda: f"d1 checked by both processes: {seen}\n{system.logs()}")
    d1 = next(w for w in seen["workers"] if w["id"] == "d1")
    assert d1["kind"] == "direct" and "tunnels" not in d1
    # 3 + 2: the shares add up to the declared 5 (a direct worker has no admission to refuse more).
    assert sorted(p["capacity"] for p in d1["processes"].values()) == [2, 3] and d1["capacity"] == 5
    async with system.http().get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200
    listing.write_text(f"default={up2},id=d2\n")
    edge_proc.signal(signal.SIGHUP)
    await wait_for(lambda: at_both("d2", gone="d1"), 20, lambda: f"d2 in, d1 out: {seen}\n{system.logs()}")
    assert edge_proc.alive() and "ended on SIGHUP" not in edge_proc.log()  # reloaded, not restarted
    async with system.http().get(edge + "/_edge/metrics", headers=system.auth()) as r:
        text = await r.text()
    assert 'edge_worker_info{kind="direct",pool="default",worker="d2"} 1.0' in text
