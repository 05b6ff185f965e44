"""One picture across the processes of `--processes N`: each process answers
its siblings on a local Unix socket (`<runtime dir>/edge-<i>.sock`) with a
small JSON snapshot of its registry, and `/_edge/workers` and the state
gauges of `/_edge/metrics` on any process merge its own snapshot with its
siblings'. A sibling that does not answer within `TIMEOUT` is reported as
missing, never waited for longer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

from aiohttp import web

from .admin import worker_info
from .metrics import tasks_by_coroutine
from .state import STATE, EdgeState
from .supervisor import socket_path

log = logging.getLogger("edge_proxy")

TIMEOUT = 1.0  # seconds a sibling may take to answer
MAX_SNAPSHOT = 64 * 1024 * 1024


def snapshot(state: EdgeState) -> dict[str, Any]:
    """This process's registry as plain JSON data."""
    now = time.monotonic()
    workers = []
    for w in state.registry.workers.values():
        info = worker_info(w, now, state.config.health_path)
        info["check_age_s"] = None if w.health.last_check is None else round(now - w.health.last_check, 3)
        announced = [hello.capacity for s in w.sessions.values()  # the capacity in its HELLO
                     if (hello := getattr(getattr(s, "conn", None), "hello", None)) is not None]
        declared = [spec.capacity for s in w.sessions.values()  # a direct worker's, as the operator declared it
                    if (spec := getattr(s, "spec", None)) is not None]
        info["announced_capacity"] = max(announced or declared or [w.capacity])
        workers.append(info)
    pools = state.registry.pools
    return {
        "process": state.config.process_index,
        "pid": os.getpid(),
        "draining": state.draining,
        "workers": workers,
        "pools": state.registry.pool_names(),
        "waiting": {name: len(p.waiters) for name, p in pools.items()},
        "tunnels": sum(len(w.sessions) for w in state.registry.workers.values() if w.kind == "tunnel"),
        "requests": state.metrics.requests_total(),
        "tasks": tasks_by_coroutine(asyncio.all_tasks()),
        "heap_blocks": sys.getallocatedblocks(),
    }


async def serve(app: web.Application) -> asyncio.AbstractServer:
    """Answer the siblings; the socket's appearance tells the supervisor this
    process is listening."""
    state = app[STATE]
    path = socket_path(state.config.runtime_dir, state.config.process_index)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(TIMEOUT):
                await reader.readline()
            writer.write(json.dumps(snapshot(state)).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        except Exception:
            log.exception("answering a sibling failed")
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    tmp = path.with_suffix(".tmp")
    server = await asyncio.start_unix_server(answer, path=str(tmp))
    os.replace(tmp, path)  # appears only once it accepts
    return server


async def ask(runtime_dir: str, index: int) -> dict[str, Any] | None:
    """Sibling `index`'s snapshot, or None if it does not answer in time."""
    writer = None
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(str(socket_path(runtime_dir, index)),
                                                                limit=MAX_SNAPSHOT)
            writer.write(b"snapshot\n")
            line = await reader.readline()
        data = json.loads(line)
        return data if isinstance(data, dict) else None
    except (TimeoutError, OSError, ValueError):
        return None
    finally:
        if writer is not None:
            writer.close()


async def gather(state: EdgeState) -> tuple[list[dict[str, Any]], list[int]]:
    """Every process's snapshot (this one's first) and the indexes that did not answer."""
    cfg = state.config
    others = [i for i in range(cfg.processes) if i != cfg.process_index]
    answers = await asyncio.gather(*(ask(cfg.runtime_dir, i) for i in others))
    snaps = [snapshot(state)] + [a for a in answers if a is not None]
    return snaps, [i for i, a in zip(others, answers, strict=True) if a is None]


_SUMMED = ("in_flight", "served", "errors", "shed", "effective_capacity", "ejections", "ejections_capped")


def merge_workers(snaps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per worker id across processes: counts summed, `processes`
    = the per-process part (tunnels, in flight, health), health and its
    detail from the process whose active check is freshest, RTT the least."""
    merged: dict[str, dict[str, Any]] = {}
    freshest: dict[str, float] = {}
    for snap in sorted(snaps, key=lambda s: int(s.get("process", 0))):
        proc = str(snap.get("process", 0))
        for w in snap.get("workers", []):
            wid = w["id"]
            tunnel = w.get("kind", "tunnel") == "tunnel"  # a direct worker has no tunnel fields (admin.worker_info)
            part = {"in_flight": w["in_flight"], "served": w["served"], "capacity": w["capacity"],
                    "health": w["health"], "available": w["available"], "pid": snap.get("pid")}
            if tunnel:
                part["tunnels"] = w["tunnels"]
            age = w.get("check_age_s")
            age_key = float("inf") if age is None else float(age)
            m = merged.get(wid)
            if m is None:
                m = merged[wid] = {**w, "processes": {}}
                if tunnel:
                    m["tunnels"] = []
                m["capacity"] = w.get("announced_capacity", w["capacity"])
                for k in _SUMMED:
                    m[k] = 0
                freshest[wid] = float("inf")
            for k in _SUMMED:
                m[k] += w.get(k, 0)
            m["processes"][proc] = part
            if tunnel:
                m["tunnels"] = sorted({*m["tunnels"], *(f"{proc}/{t}" for t in w["tunnels"])})
            m["available"] = m["available"] or w["available"]
            if age_key < freshest[wid] or (age_key == freshest[wid] == float("inf")):
                freshest[wid] = age_key
                for k in ("health", "health_detail", "last_check_error", "agent_report"):
                    if k in w:
                        m[k] = w[k]
            if tunnel:
                rtts = [r for r in (m.get("tunnel_rtt_ms"), w.get("tunnel_rtt_ms")) if r is not None]
                m["tunnel_rtt_ms"] = min(rtts) if rtts else None
            m["connected_for_s"] = max(m["connected_for_s"], w["connected_for_s"])
    for m in merged.values():
        m.pop("check_age_s", None)
        m.pop("announced_capacity", None)
    return list(merged.values())


async def workers_page(state: EdgeState) -> web.Response:
    snaps, missing = await gather(state)
    pools = sorted({p for s in snaps for p in s.get("pools", [])})
    cfg = state.config
    return web.json_response({
        "workers": merge_workers(snaps),
        "pools": pools,
        "edge": {"process": cfg.process_index, "processes": cfg.processes,
                 "answered": sorted(int(s["process"]) for s in snaps), "missing": missing},
    })


async def metrics_page(state: EdgeState) -> web.Response:
    snaps, missing = await gather(state)
    body = state.metrics.render_merged(snaps, merge_workers(snaps), state.config.processes, missing)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def admin_page(state: EdgeState, norm: str) -> web.Response | None:
    """The merged /_edge/workers and /_edge/metrics; None for other pages."""
    if norm == "/_edge/workers":
        return await workers_page(state)
    if norm == "/_edge/metrics":
        return await metrics_page(state)
    return None
