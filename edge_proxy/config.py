"""Settings of the edge proxy, with their documented defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunnel import PeerSettings

from .health import HealthPolicy
from .overload import LimitPolicy


@dataclass(slots=True)
class EdgeConfig:
    host: str = "0.0.0.0"
    port: int = 8443
    cert: str | None = None
    key: str | None = None
    client_keys: str | None = None
    worker_tokens: str | None = None
    worker_ca: str | None = None  # optional mTLS for agents
    require_worker_cert: bool = False
    # Limits
    max_body: int = 64 * 1024 * 1024  # request body bytes -> 413 beyond
    buffer_response: int = 1024 * 1024  # responses up to this size are buffered, so Server-Timing can carry `edge`
    replay_buffer: int = 1024 * 1024  # request bytes kept to retry a refused request on another worker
    # Admission
    queue_timeout: float = 5.0  # longest wait for a free worker slot -> 503
    max_queue: int = 1000  # waiting requests per pool -> 503 beyond
    # Timeouts
    upstream_timeout: float = 60.0  # request sent -> response head -> 504
    idle_timeout: float = 60.0  # no response byte for this long -> 504 / abort
    handshake_timeout: float = 5.0
    # A connection must deliver a complete request head within this long of
    # opening or of its previous response (bounds slowloris on headers).
    keepalive_timeout: float = 15.0
    client_body_timeout: float = 30.0  # a request body may stall this long between chunks -> 408
    max_headers: int = 100  # header lines per request -> 400 beyond
    max_field_size: int = 8190  # bytes per header line -> 400 beyond
    # Liveness
    heartbeat_interval: float = 1.0
    dead_after: float = 3.0  # a tunnel silent this long is declared dead
    health: HealthPolicy = field(default_factory=HealthPolicy)  # checks, ejection and its cap (max_ejection_percent)
    # How far a worker's concurrency drops while it sheds load (503 +
    # Retry-After, 429) and how fast it comes back (recovery_time, 0 = off).
    shed_limit: LimitPolicy = field(default_factory=LimitPolicy)
    health_path: str = "/healthz"
    # Rate limits (per client key); 0 disables
    rate_limit: float = 1000.0
    rate_burst: float = 2000.0
    auth_failures_per_minute: float = 60.0  # per client address, then 429
    # Memory: seconds between returns of freed heap pages to the system (glibc
    # malloc_trim; see tunnel/allocator.py), 0 = never
    malloc_trim_interval: float = 30.0
    # Shutdown
    grace: float = 10.0
    tunnel_settings: PeerSettings = field(default_factory=PeerSettings)
