"""Settings of the edge proxy, each declared once: its default, flag
(`--field-name`), environment variable (`EDGE_FIELD_NAME`) and help come from
the field below (runtime/settings.py). `edge-proxy serve --help`,
deploy/systemd/edge-proxy.env and docs/settings.md follow from it."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from runtime.settings import option, validated
from tunnel import PeerSettings
from tunnel.handshake import HEALTH_PATH_RULE, MAX_PROCESSES, is_valid_health_path

from .direct_spec import SYNTAX, DirectSpec, parse_direct
from .health import HealthPolicy
from .overload import LimitPolicy


def parse_count(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def parse_positive_seconds(value: str) -> float:
    s = float(value)
    if not s > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {value!r}")
    return s


def parse_processes(value: str) -> int:
    """`--processes`: a count of 1 or more, or `auto` for the CPU count."""
    if value.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes or 'auto', got {value!r}") from None
    if not 1 <= n <= MAX_PROCESSES:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_PROCESSES} (or 'auto'), got {n}")
    return n


def parse_hostport(value: str) -> str:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return value


def parse_public_path(value: str) -> str:
    if not is_valid_health_path(value) or "?" in value or value.startswith("/_edge"):
        raise argparse.ArgumentTypeError(f"{value!r} must be a path starting with one '/', printable ASCII without "
                                         "spaces or '?', outside /_edge")
    return value


LISTEN = "Where and how to listen"
LIMITS = "Limits"
TIMEOUTS = "Timeouts"
TUNNELS = "Tunnels and health"
CLIENTS = "Client rate limits"
PROCESS = "Process"
INSPECTOR = "The inspector (/_edge/)"
DIRECT = "Direct workers (over a VPN)"


@dataclass(slots=True)
class EdgeConfig:
    listen: str = option("0.0.0.0:8443", parse=parse_hostport, metavar="HOST:PORT", group=LISTEN,
                         help="HOST:PORT to serve HTTPS on")
    cert: str | None = option(None, group=LISTEN, metavar="FILE", help="server certificate PEM")
    key: str | None = option(None, group=LISTEN, metavar="FILE", help="server private key PEM")
    client_keys: str | None = option(None, group=LISTEN, metavar="FILE",
                                     help="client API key file (edge-proxy keys create)")
    worker_tokens: str | None = option(None, group=LISTEN, metavar="FILE",
                                       help="worker token file (edge-proxy tokens create)")
    worker_ca: str | None = option(None, group=LISTEN, metavar="FILE",
                                   help="CA that signs worker client certificates; enables mTLS for agents")
    require_worker_cert: bool = option(False, group=LISTEN,
                                       help="refuse tunnels without a worker client certificate")
    insecure_http: bool = option(False, group=LISTEN,
                                 help="serve plain HTTP (only behind a TLS-terminating load balancer)")
    # Limits
    max_body: int = option(64 * 1024 * 1024, group=LIMITS, help="largest request body in bytes; larger -> 413")
    buffer_response: int = option(1024 * 1024, group=LIMITS,
                                  help="responses up to this many bytes are buffered so Server-Timing can carry "
                                       "`edge`; larger ones stream")
    replay_buffer: int = option(1024 * 1024, group=LIMITS,
                                help="request body bytes kept to retry a refused request on another worker")
    queue_timeout: float = option(5.0, group=LIMITS, help="seconds a request may wait for a worker slot before 503")
    max_queue: int = option(1000, group=LIMITS, help="requests that may wait per pool before 503")
    max_headers: int = option(100, group=LIMITS, help="header lines per request; more -> 400")
    max_field_size: int = option(8190, group=LIMITS, help="bytes per header line; more -> 400")
    # Timeouts
    upstream_timeout: float = option(60.0, group=TIMEOUTS, help="seconds from request sent to response head before 504")
    idle_timeout: float = option(60.0, group=TIMEOUTS, help="seconds without a response byte before 504/abort")
    handshake_timeout: float = option(5.0, group=TIMEOUTS, help="seconds a new tunnel may take to send its HELLO")
    keepalive_timeout: float = option(15.0, group=TIMEOUTS,
                                      help="seconds a connection may take to send a complete request head (also "
                                           "the idle keep-alive; bounds slowloris)")
    client_body_timeout: float = option(30.0, group=TIMEOUTS, help="seconds a request body may stall before 408")
    # Liveness and health
    heartbeat_interval: float = option(1.0, group=TUNNELS, help="seconds between tunnel pings")
    dead_after: float = option(3.0, group=TUNNELS, help="a tunnel silent this many seconds is dead")
    health: HealthPolicy = field(default_factory=HealthPolicy)  # checks, ejection and its cap (max_ejection_percent)
    # How far a worker's concurrency drops while it sheds load (503 +
    # Retry-After, 429) and how fast it comes back (recovery_time, 0 = off).
    shed_limit: LimitPolicy = field(default_factory=LimitPolicy)
    health_path: str = option("/healthz", group=TUNNELS, parse=validated(is_valid_health_path, HEALTH_PATH_RULE),
                              help="path of the active checks for agents that declare none in their HELLO (older "
                                   "agents); an agent's own --health-path always wins")
    # Direct workers (docs/operations.md, "Direct workers")
    direct: list[DirectSpec] = option(default_factory=list, flag="--direct", repeat=True, separator=";",
                                      parse=parse_direct, group=DIRECT, metavar=SYNTAX,
                                      help="a worker the edge dials itself over plain HTTP, typically at its VPN "
                                           "address (edge-proxy vpn init prints these); it joins POOL beside tunnel "
                                           "workers. Default capacity 4, health path --health-path, id "
                                           "direct-HOST:PORT. Repeatable; the variable separates them with ';'")
    directs: str | None = option(None, group=DIRECT, metavar="FILE",
                                 help="a file of direct workers, one POOL=URL[,...] per line, '#' comments; "
                                      "re-read on SIGHUP (added ones join, removed ones drain and leave)")
    direct_keepalive: float = option(4.0, group=DIRECT, parse=parse_positive_seconds,
                                     help="seconds an idle connection to a direct worker is kept for reuse; keep it "
                                          "below the worker server's own keep-alive (uvicorn 5, aiohttp 75) so that "
                                          "the worker never closes one just as the edge reuses it")
    direct_connect_timeout: float = option(2.0, group=DIRECT, parse=parse_positive_seconds,
                                           help="seconds the edge may take to connect to a direct worker; then "
                                                "the request is tried on another worker")
    # Rate limits (per client key); 0 disables
    rate_limit: float = option(1000.0, group=CLIENTS, help="requests/s per client key, 0 = off")
    rate_burst: float = option(2000.0, group=CLIENTS, help="burst size per client key")
    auth_failures_per_minute: float = option(60.0, group=CLIENTS,
                                             help="failed authentications per minute from one address before 429")
    public_path: list[str] = option(default_factory=list, flag="--public-path", repeat=True, parse=parse_public_path,
                                    group=CLIENTS, metavar="PATH",
                                    help="a path (at the worker, so it holds under /pools/<name> too) whose GET and "
                                         "HEAD need no client key, e.g. /live for the inference server's live page, "
                                         "which browsers open before they can present a key; never WebSocket "
                                         "upgrades. Repeatable; none by default")
    # WebSockets (see docs/operations.md)
    ws_max_message: int = option(16 * 1024 * 1024, group=LIMITS,
                                 help="largest WebSocket message in bytes, either way; larger -> close 1009")
    ws_idle_timeout: float = option(300.0, group=TIMEOUTS,
                                    help="seconds without a WebSocket message either way before the edge closes it "
                                         "(1001), 0 = never")
    # The inspector (docs/operations.md, "The inspector")
    inspector_requests: int = option(1000, group=INSPECTOR, parse=parse_count,
                                     help="recent requests the inspector keeps (method, path without the query, "
                                          "pool, worker, status, timings; no bodies or secrets), 0 = keep none")
    inspector_session_ttl: float = option(8 * 3600.0, group=INSPECTOR, parse=parse_positive_seconds,
                                          help="seconds a browser stays signed in to the inspector")
    # Process
    processes: int = option(1, group=PROCESS, parse=parse_processes, metavar="N|auto",
                            help="edge processes sharing the port (SO_REUSEPORT) under one supervisor that restarts "
                                 "any that dies; agents hold a tunnel to every one (docs/operations.md, \"Several "
                                 "processes\"); auto = the CPU count, 1 = one process and no supervisor")
    malloc_trim_interval: float = option(30.0, group=PROCESS,
                                         help="seconds between returns of freed heap pages to the system (glibc "
                                              "malloc_trim), 0 = never")
    grace: float = option(10.0, group=PROCESS, help="seconds to drain in-flight requests on SIGTERM (then WebSockets close with 1001)")
    log_level: str = option("info", group=PROCESS, choices=("debug", "info", "warning", "error"), help="log level")
    loop: str = option("auto", group=PROCESS, choices=("auto", "uvloop", "asyncio"),
                       help="event loop: auto picks uvloop when installed")
    tunnel_settings: PeerSettings = field(default_factory=PeerSettings)
    # Set for a child of `--processes N` by its supervisor (edge_proxy/supervisor.py), not options:
    # this process's index and the directory of the siblings' sockets and metrics files.
    process_index: int = 0
    runtime_dir: str = ""

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])
