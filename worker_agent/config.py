"""Settings of the worker agent, each declared once: its default, flag
(`--field-name`), environment variable (`AGENT_FIELD_NAME`) and help come from
the field below (runtime/settings.py). `worker-agent --help`,
deploy/systemd/worker-agent.env and docs/settings.md follow from it."""

from __future__ import annotations

import argparse
import re
import secrets
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from runtime.settings import option, validated
from tunnel.handshake import HEALTH_PATH_RULE, NAME_RULE, is_valid_health_path, is_valid_name

EDGE = "The edge(s) and credentials"
WORK = "The upstream and the work it takes"
TIMING = "Timeouts and liveness"
PROCESS = "Process"


def parse_label(value: str) -> tuple[str, str]:
    k, sep, v = value.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"a label is KEY=VALUE, got {value!r}")
    return k, v


def parse_capacity(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


@dataclass(slots=True)
class AgentConfig:
    edges: list[str] = option(default_factory=list, flag="--edge", env="AGENT_EDGE", repeat=True, group=EDGE,
                              metavar="URL", help="edge tunnel URL wss://HOST:PORT/_edge/tunnel; repeat for several "
                                                  "edges (the variable is comma-separated)")
    token: str = option("", group=EDGE, secret=True, help="worker token (edge-proxy tokens create)")
    token_file: str | None = option(None, group=EDGE, metavar="FILE", help="file holding the worker token")
    max_auth_failures: int = option(0, group=EDGE,
                                    help="give up (exit 2) after the edge refused the worker token this many times "
                                         "in a row; the waits between attempts double up to 60 s. 0 = never give up")
    ca: str | None = option(None, group=EDGE, metavar="FILE",
                            help="CA file that signs the edge certificate; unset = the system trust store")
    insecure: bool = option(False, group=EDGE,
                            help="do NOT verify the edge certificate (testing only; logs a warning)")
    client_cert: str | None = option(None, group=EDGE, metavar="FILE", help="client certificate for mTLS")
    client_key: str | None = option(None, group=EDGE, metavar="FILE", help="its private key")
    upstream: str = option("http://127.0.0.1:8000", group=WORK, metavar="URL", help="local inference server")
    pool: str = option("default", group=WORK, help="pool this worker serves")
    capacity: int = option(4, parse=parse_capacity, group=WORK, help="requests this worker takes at once")
    agent_id: str = option("", flag="--id", env="AGENT_ID", group=WORK, parse=validated(lambda v: not v or is_valid_name(v), NAME_RULE),
                           show=lambda _: "HOSTNAME-UPSTREAMPORT-XXXX",
                           help="worker id, unique per edge; the edge refuses a second live process with the same id. "
                                "The default (4 random hex digits at the end) is unique per process; set it for a "
                                "name that survives restarts")
    tunnels_per_edge: int = option(1, group=WORK, help="parallel tunnels to each edge; to each of its processes "
                                                        "when it runs several (edge-proxy serve --processes N)")
    labels: dict[str, str] = option(default_factory=dict, flag="--label", repeat=True, parse=parse_label,
                                    group=WORK, metavar="KEY=VALUE",
                                    help="KEY=VALUE shown at the edge; repeat (the variable is comma-separated)")
    health_path: str = option("/healthz", group=WORK, parse=validated(is_valid_health_path, HEALTH_PATH_RULE),
                              help="upstream health path, probed by the agent and declared to the edge, whose active "
                                   "checks use it too, e.g. /v2/health/ready for KServe/Triton servers")
    health_interval: float = option(2.0, group=WORK, help="seconds between upstream health probes")
    upstream_timeout: float = option(300.0, group=TIMING, help="seconds one upstream exchange may take")
    buffer_response: int = option(256 * 1024, group=TIMING,
                                  help="responses up to this many bytes are read whole, so `agent` timing is "
                                       "complete; larger ones stream")
    ws_max_message: int = option(16 * 1024 * 1024, group=WORK,
                                 help="largest WebSocket message in bytes, either way; larger -> close 1009")
    grace: float = option(10.0, group=TIMING, help="seconds to finish in-flight requests on SIGTERM")
    heartbeat_interval: float = option(1.0, group=TIMING, help="seconds between tunnel pings")
    dead_after: float = option(3.0, group=TIMING, help="an edge silent this long is dead; reconnect")
    log_level: str = option("info", group=PROCESS, choices=("debug", "info", "warning", "error"), help="log level")
    tunnel_client: str = option("own", group=PROCESS, choices=("own", "websockets"),
                                help="WebSocket client of the tunnel: own = websockets' sans-I/O protocol on the "
                                     "agent's own asyncio protocol (fewer copies and hops per message); websockets = "
                                     "its asyncio client (used anyway when an https_proxy applies to the edge URL)")
    loop: str = option("auto", group=PROCESS, choices=("auto", "uvloop", "asyncio"),
                       help="event loop: auto picks uvloop when installed")

    # Where the token came from, as the operator spelled it ("--token-file /x",
    # "AGENT_TOKEN", ...), for messages; set by the CLI, not an option.
    token_source: str = ""

    def __post_init__(self) -> None:
        if not self.agent_id:
            self.agent_id = default_agent_id(self.upstream)


def default_agent_id(upstream: str) -> str:
    """`<hostname>-<upstream port>-<4 random hex>`, e.g. `gpu-box-8000-3f9a`.

    The hostname and port say where the worker runs and which server it
    fronts; the random part keeps two agents that share both apart (the
    agents of two containers with the host's name, each upstream on :8000).
    It changes at each start; pass --id for a name that stays."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]).strip("-._")[:64] or "worker"
    try:
        port = urlsplit(upstream).port
    except ValueError:
        port = None
    if port is None:
        port = 443 if upstream.startswith("https:") else 80
    return f"{host}-{port}-{secrets.token_hex(2)}"
