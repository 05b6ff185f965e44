"""Settings of the worker agent, with their documented defaults."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field


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
    agent_id: str = field(default_factory=socket.gethostname)
    tunnels_per_edge: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    health_path: str = "/healthz"
    health_interval: float = 2.0
    upstream_timeout: float = 300.0  # a whole upstream exchange
    buffer_response: int = 256 * 1024  # responses up to this size are read whole, so `agent` timing is complete
    ws_max_message: int = 16 * 1024 * 1024  # largest WebSocket message either way -> close 1009 beyond
    grace: float = 10.0  # seconds to finish in-flight requests on SIGTERM
    heartbeat_interval: float = 1.0
    dead_after: float = 3.0
