"""Hop by hop: the hops of the timing contract (parsed by `httpcontract.timing`),
the derived network hops, and one request's latency split into
non-overlapping segments.

All durations are milliseconds. Pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping

from httpcontract import timing

parse_server_timing = timing.parse  # the loadtest API

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
             "upstream", "net_edge_direct", "agent_overhead", *INFERENCE)


def is_direct(hops: Mapping[str, float]) -> bool:
    """A request the edge sent to a direct worker itself (over a VPN, say):
    the edge's `upstream` entry with no tunnel and no agent in between."""
    return "upstream" in hops and "edge" in hops and "tunnel" not in hops and "agent" not in hops


def derive(hops: Mapping[str, float]) -> dict[str, float]:
    """The derived hops whose two operands are both present. Through a
    direct worker, `upstream - app` is the edge<->worker leg (`net_edge_direct`),
    not an agent's overhead."""
    out = {name: hops[a] - hops[b] for name, (a, b) in DERIVED.items() if a in hops and b in hops}
    if is_direct(hops) and "agent_overhead" in out:
        out["net_edge_direct"] = out.pop("agent_overhead")
    return out


# The segments of the stacked breakdown, in the order a request meets them.
SEGMENTS = ("client_wait", "net_client", "lb", "edge_internal", "net_edge_worker", "net_edge_direct",
            "agent_internal", "agent_overhead", "decode", "preprocess", "queue", "infer", "postprocess", "app_other")


def segments(latency_ms: float, hops: Mapping[str, float]) -> dict[str, float]:
    """Split one request's latency into non-overlapping segments that add up
    to it (from the outermost server entry present inwards):

    client_wait      latency - client_total (send lag, the pool queue)
    net_client       client_total - the outermost server total (edge, else
                     agent, else app): the network, TLS and HTTP client side
    lb               edge: waiting for a worker and choosing it
    edge_internal    edge - lb - tunnel (through a direct worker: edge - lb - upstream)
    net_edge_worker  tunnel - agent
    net_edge_direct  upstream - app, through a direct worker (no tunnel, no
                     agent): the edge<->worker network (a VPN leg) and HTTP
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
        direct = is_direct(hops)
        inner = hops["upstream"] if direct else hops.get("tunnel", 0.0)
        out["edge_internal"] = hops["edge"] - lb - inner
        if "tunnel" in hops:
            agent = hops.get("agent", 0.0)
            out["net_edge_worker"] = hops["tunnel"] - agent
        if direct:
            out["net_edge_direct"] = hops["upstream"] - hops.get("app", 0.0)
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


# -- the hop tree --------------------------------------------------------------

# node -> its parent. Spans are the timing contract's nested entries (and the
# latency itself); the other nodes are the segments above, which do not overlap
# and add up to the latency. A node whose parent is absent hangs from the
# nearest present ancestor (talking to an inference server directly, `app`
# hangs from the latency).
PARENT: dict[str, str | None] = {
    "latency": None,
    "client_wait": "latency", "net_client": "latency", "edge": "latency",
    "lb": "edge", "edge_internal": "edge", "tunnel": "edge",
    "net_edge_worker": "tunnel", "agent": "tunnel",
    "agent_internal": "agent", "upstream": "agent",  # through a direct worker: from the edge (agent, tunnel absent)
    "net_edge_direct": "upstream", "agent_overhead": "upstream", "app": "upstream",
    **{n: "app" for n in (*INFERENCE[:-1], "app_other")},
}
SPANS = ("latency", "edge", "tunnel", "agent", "upstream", "app")
TREE_ORDER = tuple(PARENT)

# Every name a report shows that is not a plain Server-Timing entry, in words.
GLOSSARY: dict[str, str] = {
    "latency": "from the request's intended send time (open loop) or its send (closed loop) to its answer, read",
    "client_wait": "latency minus client_total: the send came late, or waited for a pooled connection",
    "net_client": "client_total minus the outermost server's own total: the transport between the load "
                  "tester and the first server (TCP, TLS, HTTP on both ends; on loopback no network at all)",
    "edge_internal": "edge minus lb minus tunnel: the edge's own work on the request",
    "net_edge_worker": "tunnel minus agent: the tunnel's transit both ways (network only when the agent is on "
                       "another machine)",
    "agent_internal": "agent minus upstream: the agent's own work",
    "agent_overhead": "upstream minus app: HTTP between the agent and the inference server",
    "net_edge_direct": "upstream minus app, through a direct worker (no tunnel, no agent): the edge's HTTP round "
                       "trip to the worker less the app's own time: the edge<->worker network (a VPN leg) and HTTP "
                       "on both ends",
    "app_other": "app minus its reported phases: routing, reading the body, writing the answer",
    "net_client_edge": "client_total minus edge (a per-hop table name of net_client through the edge)",
    "tunnel_rtt": "the tunnel's round-trip time from the edge's heartbeats: a reading of the link, not a part "
                  "of any request",
    "tail excess": "the mean of a hop over the slowest 1% of requests minus its mean over the middle 10%: which "
                   "hop the p99 is made of",
    "PDV": "latency minus the minimum latency of the run (RFC 5481)",
    "IPDV": "|L(i) - L(i-1)| of consecutive requests (RFC 5481)",
    "RFC 3550 J": "the smoothed interarrival jitter of RTP",
    "service time": "from the actual send (not the intended one) to the answer",
}


def is_loopback(host: str | None) -> bool:
    return bool(host) and (host == "localhost" or str(host).startswith("127.") or host in ("::1", "[::1]"))


def labels(loopback: bool) -> dict[str, str]:
    """What each tree node is called; `loopback` is whether the client talks
    to its first server over the loopback interface."""
    return {
        "latency": "latency", "client_wait": "waiting to send",
        "net_client": "client <-> server: loopback (no network)" if loopback else "client <-> server: network",
        "edge": "edge", "lb": "choosing a worker", "edge_internal": "edge itself",
        "tunnel": "tunnel", "net_edge_worker": "tunnel transit", "agent": "agent",
        "agent_internal": "agent itself", "upstream": "upstream: agent (or edge, direct) -> app",
        "net_edge_direct": "edge <-> direct worker (VPN leg)",
        "agent_overhead": "agent <-> app HTTP", "app": "app (inference server)",
        "decode": "decode", "preprocess": "preprocess", "queue": "batch queue", "infer": "infer",
        "postprocess": "postprocess", "app_other": "app other",
    }


def node_values(latency_ms: float, hops: Mapping[str, float]) -> dict[str, float]:
    """One request's value at every tree node it has."""
    out = {k: v for k, v in segments(latency_ms, hops).items()}
    out["latency"] = latency_ms
    out.update({k: hops[k] for k in SPANS[1:] if k in hops})
    return out


def depths(present: set[str]) -> dict[str, int]:
    """Depth of each present node: how many of its ancestors are present."""
    out = {}
    for name in TREE_ORDER:
        if name not in present:
            continue
        d, parent = 0, PARENT[name]
        while parent is not None:
            d += parent in present
            parent = PARENT[parent]
        out[name] = d
    return out
