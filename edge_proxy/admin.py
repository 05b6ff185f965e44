"""The edge's own pages: liveness and readiness (no credentials), and for
admin keys the Prometheus metrics and the workers as JSON (the inspector's
pages are inspector_pages.py)."""

from __future__ import annotations

import time

from aiohttp import web

from .errors import EdgeError
from .registry import Worker
from .state import EdgeState


def health(state: EdgeState) -> web.Response:
    return web.json_response({"status": "draining" if state.draining else "ok"})


def ready(state: EdgeState) -> web.Response:
    now = time.monotonic()
    pools = {
        name: sum(1 for w in p.workers if w.available(now)) for name, p in state.registry.pools.items()
    }
    ok = not state.draining and any(pools.values())
    return web.json_response({"ready": ok, "healthy_workers": pools}, status=200 if ok else 503)


def health_detail(w: Worker, now: float) -> str:
    """Why the worker is not healthy ("" when it is), in one line."""
    h = w.health
    if w.live_session() is None:
        return "no tunnel accepting requests" if w.kind == "tunnel" else "leaving (removed or replaced)"
    if h.is_ejected(now):
        return f"ejected for {h.ejected_until - now:.0f} s more after consecutive failed requests"
    if not h.agent_healthy:
        return f"agent reports its upstream unhealthy: {h.agent_detail}"
    if not h.checks_healthy:
        return f"active check failed: {h.last_check_error}"
    return ""


def worker_info(w: Worker, now: float, fallback_health_path: str = "/healthz") -> dict[str, object]:
    rtt = w.rtt()
    common: dict[str, object] = {
        "id": w.agent_id,
        "kind": w.kind,
        "pool": w.pool,
        "capacity": w.capacity,
        # What shedding left of the capacity (overload.AdaptiveLimit); == capacity when not shedding.
        "effective_capacity": w.limit.effective(now, w.capacity),
        "in_flight": w.in_flight,
        "served": w.served,
        "errors": w.errors,
        "shed": w.shed,
        "health": w.health.state(now) if w.live_session() else "disconnected",
        "health_detail": health_detail(w, now),
        "health_path": w.health_path or fallback_health_path,
        "available": w.available(now),
        "last_check_error": w.health.last_check_error,
        "ejections": w.health.times_ejected,
        "ejections_capped": w.health.ejections_capped,
        "ewma_latency_ms": round(w.ewma_latency * 1000, 3),
        "connected_for_s": round(time.time() - w.connected_at, 1),
    }
    if w.kind == "direct":  # the edge dials it: its URL, and nothing of a tunnel
        return {**common, "url": w.url}
    return {**common, "agent_report": {"healthy": w.health.agent_healthy, "detail": w.health.agent_detail},
            "instance": w.instance, "tunnel_rtt_ms": None if rtt is None else round(rtt * 1000, 3),
            "tunnels": sorted(w.sessions), "software": w.software, "labels": w.labels}


def admin_page(state: EdgeState, norm: str) -> web.Response:
    now = time.monotonic()
    if norm == "/_edge/metrics":
        return web.Response(body=state.metrics.render(state.registry.snapshot()),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
    workers = [worker_info(w, now, state.config.health_path) for w in state.registry.workers.values()]
    if norm == "/_edge/workers":
        return web.json_response({"workers": workers, "pools": state.registry.pool_names()})
    raise EdgeError("no such edge endpoint", status=404, code="not_found")
