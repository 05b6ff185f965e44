"""Command line of the worker agent. Every option also reads an AGENT_*
environment variable."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from tunnel import allocator
from tunnel import eventloop as loop
from tunnel.handshake import is_valid_health_path, is_valid_name

from .agent import Agent
from .config import AgentConfig

log = logging.getLogger("worker_agent")


def build_parser() -> argparse.ArgumentParser:
    d = AgentConfig()
    e = os.environ.get
    p = argparse.ArgumentParser(prog="worker-agent", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Dial out to the edge(s) and serve their requests from a local upstream.")
    p.add_argument("--edge", action="append", default=None,
                   help="edge tunnel URL wss://HOST:PORT/_edge/tunnel; repeat for several edges "
                        "(AGENT_EDGE, comma-separated)")
    p.add_argument("--token", default=e("AGENT_TOKEN"), help="worker token (AGENT_TOKEN)")
    p.add_argument("--token-file", default=e("AGENT_TOKEN_FILE"), help="file holding the worker token (AGENT_TOKEN_FILE)")
    p.add_argument("--ca", default=e("AGENT_CA"), help="CA file that signs the edge certificate (AGENT_CA)")
    p.add_argument("--insecure", action="store_true", default=e("AGENT_INSECURE", "") in ("1", "true", "yes"),
                   help="do NOT verify the edge certificate (testing only; logs a warning) (AGENT_INSECURE)")
    p.add_argument("--client-cert", default=e("AGENT_CLIENT_CERT"), help="client certificate for mTLS (AGENT_CLIENT_CERT)")
    p.add_argument("--client-key", default=e("AGENT_CLIENT_KEY"), help="its private key (AGENT_CLIENT_KEY)")
    p.add_argument("--upstream", default=e("AGENT_UPSTREAM", d.upstream), help="local inference server (AGENT_UPSTREAM)")
    p.add_argument("--pool", default=e("AGENT_POOL", d.pool), help="pool this worker serves (AGENT_POOL)")
    p.add_argument("--capacity", type=int, default=int(e("AGENT_CAPACITY", d.capacity)),
                   help="requests this worker takes at once (AGENT_CAPACITY)")
    p.add_argument("--id", dest="agent_id", default=e("AGENT_ID", ""),
                   help="worker id, unique per edge; the edge refuses a second live process with the same id. "
                        "Default: HOSTNAME-UPSTREAMPORT-XXXX (4 random hex), unique per process; set it for a "
                        "name that survives restarts (AGENT_ID)")
    p.add_argument("--tunnels-per-edge", type=int, default=int(e("AGENT_TUNNELS_PER_EDGE", d.tunnels_per_edge)),
                   help="parallel tunnels to each edge (AGENT_TUNNELS_PER_EDGE)")
    p.add_argument("--label", action="append", default=None, help="KEY=VALUE shown at the edge (AGENT_LABELS, comma-separated)")
    p.add_argument("--health-path", default=e("AGENT_HEALTH_PATH", d.health_path),
                   help="upstream health path, probed by the agent and declared to the edge, whose active checks "
                        "use it too, e.g. /v2/health/ready for KServe/Triton servers (AGENT_HEALTH_PATH)")
    p.add_argument("--health-interval", type=float, default=float(e("AGENT_HEALTH_INTERVAL", d.health_interval)),
                   help="seconds between upstream health probes (AGENT_HEALTH_INTERVAL)")
    p.add_argument("--upstream-timeout", type=float, default=float(e("AGENT_UPSTREAM_TIMEOUT", d.upstream_timeout)),
                   help="seconds one upstream exchange may take (AGENT_UPSTREAM_TIMEOUT)")
    p.add_argument("--grace", type=float, default=float(e("AGENT_GRACE", d.grace)),
                   help="seconds to finish in-flight requests on SIGTERM (AGENT_GRACE)")
    p.add_argument("--heartbeat-interval", type=float, default=float(e("AGENT_HEARTBEAT_INTERVAL", d.heartbeat_interval)),
                   help="seconds between tunnel pings (AGENT_HEARTBEAT_INTERVAL)")
    p.add_argument("--dead-after", type=float, default=float(e("AGENT_DEAD_AFTER", d.dead_after)),
                   help="an edge silent this long is dead; reconnect (AGENT_DEAD_AFTER)")
    p.add_argument("--log-level", default=e("AGENT_LOG_LEVEL", "info"), help="debug|info|warning (AGENT_LOG_LEVEL)")
    p.add_argument("--loop", choices=loop.CHOICES, default=e("AGENT_LOOP", "auto"),
                   help="event loop: auto picks uvloop when installed (AGENT_LOOP)")
    return p


def config_from_args(a: argparse.Namespace) -> AgentConfig:
    edges = a.edge or [u for u in os.environ.get("AGENT_EDGE", "").split(",") if u]
    token = a.token or ""
    if a.token_file:
        try:
            token = Path(a.token_file).read_text().strip()
        except OSError as exc:
            raise SystemExit(f"error: cannot read token file {a.token_file}: {exc.strerror}") from None
    raw_labels = a.label or [x for x in os.environ.get("AGENT_LABELS", "").split(",") if x]
    labels = {}
    for item in raw_labels:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"error: label {item!r} must be KEY=VALUE")
        labels[k] = v
    if a.capacity < 1:
        raise SystemExit("error: --capacity must be at least 1")
    if not is_valid_health_path(a.health_path):
        raise SystemExit(f"error: --health-path {a.health_path!r} must be a path starting with one '/', printable "
                         "ASCII without spaces, at most 1024 characters")
    if a.agent_id and not is_valid_name(a.agent_id):
        raise SystemExit(f"error: --id {a.agent_id!r} must be 1-128 letters, digits, '.', '_', ':' or '-', "
                         "starting with a letter or digit")
    return AgentConfig(
        edges=edges, token=token, ca=a.ca, insecure=a.insecure, client_cert=a.client_cert, client_key=a.client_key,
        upstream=a.upstream, pool=a.pool, capacity=a.capacity, agent_id=a.agent_id,
        tunnels_per_edge=a.tunnels_per_edge, labels=labels, health_path=a.health_path,
        health_interval=a.health_interval, upstream_timeout=a.upstream_timeout, grace=a.grace,
        heartbeat_interval=a.heartbeat_interval, dead_after=a.dead_after,
    )


async def run(cfg: AgentConfig) -> None:
    agent = Agent(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    log.info("agent %s (instance %s): pool %s, capacity %d, upstream %s (checked at %s), edges %s", cfg.agent_id,
             agent.instance, cfg.pool, cfg.capacity, cfg.upstream, cfg.health_path, ", ".join(cfg.edges))
    await agent.run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        allocator.pin_mmap_threshold()  # keeps RSS flat under long TLS traffic
        loop.run(run(config_from_args(args)), args.loop)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        pass
    return 0
