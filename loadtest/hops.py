"""Hop by hop: the hops of the timing contract (parsed by `httpcontract.timing`),
the derived network hops, and one request's latency split into
non-overlapping segments.

All durations are milliseconds. Pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping

from httpcontract.timing import parse as parse_server_timing  # noqa: F401  (the loadtest API)

__all__ = ["parse_server_timing"]  # re-exported: report.py and streamreport.py use it from here

# Entries of the timing contract, outermost hop last.
INFERENCE = ("decode", "preprocess", "queue", "infer", "postprocess", "app")
AGENT = ("upstream", "agent")
EDGE = ("lb", "tunnel", "edge")
SERVER_HOPS = (*INFERENCE, *AGENT, *EDGE, "tunnel_rtt")

# Client phases from aiohttp's TraceConfig (see runner.RequestTiming).
CLIENT_PHASES = ("client_queue", "client_dns", "client_connect", "client_tls", "client_send", "client_ttfb",
                 "client_body", "client_total")
CLIENT_TOTAL = "client_total"

# name -> (minuend, subtrahend): the derived hops of DESIGN.md.
DERIVED: dict[str, tuple[str, str]] = {
    "net_client_edge": (CLIENT_TOTAL, "edge"),
    "net_edge_worker": ("tunnel", "agent"),
    "agent_overhead": ("upstream", "app"),
}

HOP_ORDER = (*CLIENT_PHASES, "net_client_edge", "lb", "tunnel", "net_edge_worker", "tunnel_rtt", "edge", "agent",
             "upstream", "agent_overhead", *INFERENCE)


def derive(hops: Mapping[str, float]) -> dict[str, float]:
    """The derived hops whose two operands are both present."""
    return {name: hops[a] - hops[b] for name, (a, b) in DERIVED.items() if a in hops and b in hops}


# The segments of the stacked breakdown, in the order a request meets them.
SEGMENTS = ("client_wait", "net_client", "lb", "edge_internal", "net_edge_worker", "agent_internal",
            "agent_overhead", "decode", "preprocess", "queue", "infer", "postprocess", "app_other")


def segments(latency_ms: float, hops: Mapping[str, float]) -> dict[str, float]:
    """Split one request's latency into non-overlapping segments that add up
    to it (from the outermost server entry present inwards):

    client_wait      latency - client_total (send lag, the pool queue)
    net_client       client_total - the outermost server total (edge, else
                     agent, else app): the network, TLS and HTTP client side
    lb               edge: waiting for a worker and choosing it
    edge_internal    edge - lb - tunnel
    net_edge_worker  tunnel - agent
    agent_internal   agent - upstream
    agent_overhead   upstream - app
    decode ... postprocess, app_other = app - the sum of the inference phases
    """
    out: dict[str, float] = {}
    total = hops.get(CLIENT_TOTAL, latency_ms)
    out["client_wait"] = latency_ms - total
    outer = next((hops[n] for n in ("edge", "agent", "app") if n in hops), 0.0)
    out["net_client"] = total - outer
    if "edge" in hops:
        lb = hops.get("lb", 0.0)
        out["lb"] = lb
        inner = hops.get("tunnel", 0.0)
        out["edge_internal"] = hops["edge"] - lb - inner
        if "tunnel" in hops:
            agent = hops.get("agent", 0.0)
            out["net_edge_worker"] = hops["tunnel"] - agent
    if "agent" in hops:
        up = hops.get("upstream", 0.0)
        out["agent_internal"] = hops["agent"] - up
        if "upstream" in hops:
            out["agent_overhead"] = hops["upstream"] - hops.get("app", 0.0)
    if "app" in hops:
        parts = 0.0
        for n in INFERENCE[:-1]:
            if n in hops:
                out[n] = hops[n]
                parts += hops[n]
        out["app_other"] = hops["app"] - parts
    return out


def order_key(name: str) -> tuple[int, str]:
    """Sort hops in the order of HOP_ORDER, unknown names after, by name."""
    try:
        return HOP_ORDER.index(name), name
    except ValueError:
        return len(HOP_ORDER), name
