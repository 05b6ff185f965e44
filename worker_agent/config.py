"""Settings of the worker agent, with their documented defaults."""

from __future__ import annotations

import re
import secrets
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass(slots=True)
class AgentConfig:
    edges: list[str] = field(default_factory=list)  # wss://host:port/_edge/tunnel, one tunnel set per edge
    token: str = ""
    ca: str | None = None  # CA file that signs the edge certificate; None = system trust store
    insecure: bool = False  # skip certificate verification (logged loudly)
    client_cert: str | None = None  # optional mTLS
    client_key: str | None = None
    upstream: str = "http://127.0.0.1:8000"
    pool: str = "default"
    capacity: int = 4
    agent_id: str = ""  # "" = default_agent_id(upstream): unique per process, see there
    tunnels_per_edge: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    health_path: str = "/healthz"
    health_interval: float = 2.0
    upstream_timeout: float = 300.0  # a whole upstream exchange
    buffer_response: int = 256 * 1024  # responses up to this size are read whole, so `agent` timing is complete
    grace: float = 10.0  # seconds to finish in-flight requests on SIGTERM
    heartbeat_interval: float = 1.0
    dead_after: float = 3.0

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
