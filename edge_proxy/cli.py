"""Command line of the edge proxy: `certs`, `keys`, `tokens`, `serve`.
Every option of `serve` also reads an EDGE_* environment variable."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import replace

from aiohttp import web

from tunnel import allocator
from tunnel import eventloop as loop

from . import auth, certs
from .app import drain, make_app
from .config import EdgeConfig
from .health import HealthPolicy
from .overload import LimitPolicy

log = logging.getLogger("edge_proxy")


def _env(name: str, default: object = None) -> object:
    return os.environ.get(name, default)


def _percent(value: str) -> float:
    try:
        p = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage from 0 to 100, got {value!r}") from None
    if not 0 <= p <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentage from 0 to 100, got {value!r}")
    return p


def _seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (0 or more), got {value!r}") from None
    if s < 0:
        raise argparse.ArgumentTypeError(f"expected seconds (0 or more), got {value!r}")
    return s


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-proxy", description="Public HTTPS edge in front of workers behind NAT.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("certs", help="create a local CA, the edge certificate and worker client certificates")
    c.add_argument("--out", required=True, help="directory for ca.pem, edge.pem, edge-key.pem")
    c.add_argument("--host", action="append", required=True, help="DNS name or IP the edge is reached at (repeat)")
    c.add_argument("--worker", action="append", default=[], help="also issue a client certificate for this worker")

    for kind, what in (("keys", "client API keys"), ("tokens", "worker tokens")):
        k = sub.add_parser(kind, help=f"manage {what}")
        ksub = k.add_subparsers(dest="action", required=True)
        kc = ksub.add_parser("create", help="print a new secret once; the file keeps only its hash")
        kc.add_argument("--file", required=True)
        kc.add_argument("--name", required=True)
        if kind == "keys":
            kc.add_argument("--no-admin", action="store_true", help="this key may not read /_edge/ status pages")
            kc.add_argument("--rate", type=float, help="requests/s for this key (default: the edge's --rate-limit)")
            kc.add_argument("--burst", type=float, help="burst for this key (default: max(1, rate))")
        kr = ksub.add_parser("revoke", help="remove a secret by name")
        kr.add_argument("--file", required=True)
        kr.add_argument("--name", required=True)

    s = sub.add_parser("serve", help="run the edge", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = EdgeConfig()
    h = HealthPolicy()
    lim = LimitPolicy()
    s.add_argument("--listen", type=_hostport, default=_env("EDGE_LISTEN", f"{d.host}:{d.port}"),
                   help="HOST:PORT to serve HTTPS on (EDGE_LISTEN)")
    s.add_argument("--cert", default=_env("EDGE_CERT"), help="server certificate PEM (EDGE_CERT)")
    s.add_argument("--key", default=_env("EDGE_KEY"), help="server private key PEM (EDGE_KEY)")
    s.add_argument("--client-keys", default=_env("EDGE_CLIENT_KEYS"), help="client API key file (EDGE_CLIENT_KEYS)")
    s.add_argument("--worker-tokens", default=_env("EDGE_WORKER_TOKENS"),
                   help="worker token file (EDGE_WORKER_TOKENS)")
    s.add_argument("--worker-ca", default=_env("EDGE_WORKER_CA"),
                   help="CA that signs worker client certificates, enables mTLS (EDGE_WORKER_CA)")
    s.add_argument("--require-worker-cert", action="store_true",
                   default=_env("EDGE_REQUIRE_WORKER_CERT", "") in ("1", "true", "yes"),
                   help="refuse tunnels without a worker client certificate (EDGE_REQUIRE_WORKER_CERT)")
    s.add_argument("--insecure-http", action="store_true", default=_env("EDGE_INSECURE_HTTP", "") in ("1", "true"),
                   help="serve plain HTTP (only behind a TLS-terminating load balancer) (EDGE_INSECURE_HTTP)")
    num: list[tuple[str, Callable[[str], object], object, str]] = [
        ("max-body", int, d.max_body, "largest request body in bytes; larger -> 413"),
        ("buffer-response", int, d.buffer_response, "responses up to this size are buffered to report `edge` timing"),
        ("queue-timeout", float, d.queue_timeout, "seconds a request may wait for a worker slot before 503"),
        ("max-queue", int, d.max_queue, "requests that may wait per pool before 503"),
        ("upstream-timeout", float, d.upstream_timeout, "seconds to the response head before 504"),
        ("idle-timeout", float, d.idle_timeout, "seconds without a response byte before 504/abort"),
        ("keepalive-timeout", float, d.keepalive_timeout,
         "seconds a connection may take to send a complete request head (also the idle keep-alive)"),
        ("client-body-timeout", float, d.client_body_timeout, "seconds a request body may stall before 408"),
        ("max-headers", int, d.max_headers, "header lines per request; more -> 400"),
        ("max-field-size", int, d.max_field_size, "bytes per header line; more -> 400"),
        ("heartbeat-interval", float, d.heartbeat_interval, "seconds between tunnel pings"),
        ("dead-after", float, d.dead_after, "a tunnel silent this many seconds is dead"),
        ("check-interval", float, h.check_interval, "seconds between active /healthz checks of each worker"),
        ("check-timeout", float, h.check_timeout, "seconds an active check may take"),
        ("unhealthy-threshold", int, h.unhealthy_threshold, "failed checks in a row -> unhealthy"),
        ("healthy-threshold", int, h.healthy_threshold, "passed checks in a row -> healthy"),
        ("consecutive-failures", int, h.consecutive_failures, "5xx/timeouts in a row -> ejected"),
        ("base-ejection-time", float, h.base_ejection_time, "first ejection in seconds (n-th lasts n times it)"),
        ("max-ejection-time", float, h.max_ejection_time, "longest ejection in seconds"),
        ("max-ejection-percent", _percent, h.max_ejection_percent,
         "most workers of a pool ejected at once, in percent (always allows one; never the last available worker)"),
        ("shed-recovery-time", _seconds, lim.recovery_time,
         "seconds for a worker that shed load (503 with Retry-After, or 429) to regain its full capacity at this "
         "edge; 0 = never lower it"),
        ("rate-limit", float, d.rate_limit, "requests/s per client key, 0 = off"),
        ("rate-burst", float, d.rate_burst, "burst size per client key"),
        ("grace", float, d.grace, "seconds to drain in-flight requests on SIGTERM"),
        ("malloc-trim-interval", float, d.malloc_trim_interval,
         "seconds between returns of freed heap pages to the system (glibc malloc_trim), 0 = never"),
    ]
    for name, typ, default, text in num:
        env = "EDGE_" + name.upper().replace("-", "_")
        s.add_argument(f"--{name}", type=typ, default=_env(env, default), help=f"{text} ({env})")
    s.add_argument("--log-level", default=_env("EDGE_LOG_LEVEL", "info"), help="debug|info|warning (EDGE_LOG_LEVEL)")
    s.add_argument("--loop", choices=loop.CHOICES, default=_env("EDGE_LOOP", "auto"),
                   help="event loop: auto picks uvloop when installed (EDGE_LOOP)")
    return p


def config_from_args(a: argparse.Namespace) -> EdgeConfig:
    host, port = a.listen if isinstance(a.listen, tuple) else _hostport(a.listen)
    health = HealthPolicy(a.check_interval, a.check_timeout, a.unhealthy_threshold, a.healthy_threshold,
                          a.consecutive_failures, a.base_ejection_time, a.max_ejection_time, a.max_ejection_percent)
    return replace(
        EdgeConfig(), host=host, port=port, cert=a.cert, key=a.key, client_keys=a.client_keys,
        worker_tokens=a.worker_tokens, worker_ca=a.worker_ca, require_worker_cert=a.require_worker_cert,
        max_body=a.max_body, buffer_response=a.buffer_response, queue_timeout=a.queue_timeout, max_queue=a.max_queue,
        upstream_timeout=a.upstream_timeout, idle_timeout=a.idle_timeout, heartbeat_interval=a.heartbeat_interval,
        dead_after=a.dead_after, health=health, shed_limit=replace(LimitPolicy(), recovery_time=a.shed_recovery_time),
        rate_limit=a.rate_limit, rate_burst=a.rate_burst, grace=a.grace,
        keepalive_timeout=a.keepalive_timeout, client_body_timeout=a.client_body_timeout, max_headers=a.max_headers,
        max_field_size=a.max_field_size, malloc_trim_interval=a.malloc_trim_interval,
    )


def server_ssl_context(cfg: EdgeConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.cert or "", cfg.key)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: certificate file not found ({exc.filename}); create one with "
                         "`edge-proxy certs --out DIR --host NAME` or pass --cert/--key") from None
    except (ssl.SSLError, OSError) as exc:
        raise SystemExit(f"error: cannot load certificate {cfg.cert} / key {cfg.key}: {exc}; check that they are "
                         "PEM files and that the key matches the certificate") from None
    if cfg.worker_ca:
        try:
            ctx.load_verify_locations(cfg.worker_ca)
        except (ssl.SSLError, OSError) as exc:
            raise SystemExit(f"error: cannot load worker CA {cfg.worker_ca}: {exc}") from None
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


async def serve(cfg: EdgeConfig, insecure_http: bool = False) -> None:
    if not cfg.client_keys or not cfg.worker_tokens:
        raise SystemExit("error: --client-keys and --worker-tokens are required; create them with "
                         "`edge-proxy keys create` and `edge-proxy tokens create`")
    keys = auth.CredentialStore.load(cfg.client_keys)
    tokens = auth.CredentialStore.load(cfg.worker_tokens)
    ctx = None if insecure_http else server_ssl_context(cfg)
    if insecure_http:
        log.warning("serving plain HTTP: only do this behind a TLS-terminating load balancer")
    app = make_app(cfg, keys, tokens)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=cfg.grace,
                           keepalive_timeout=cfg.keepalive_timeout, max_headers=cfg.max_headers,
                           max_field_size=cfg.max_field_size, max_line_size=cfg.max_field_size)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=ctx, backlog=1024, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise SystemExit(f"error: port {cfg.port} on {cfg.host} is already in use; stop the other process or "
                             "choose another with --listen") from None
        raise SystemExit(f"error: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from None
    scheme = "http" if insecure_http else "https"
    log.info("edge listening on %s://%s:%d (%d client keys, %d worker tokens)", scheme, cfg.host, cfg.port,
             len(keys), len(tokens))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining for up to %.0f s", cfg.grace)
    await site.stop()  # no new connections
    await drain(app)
    await runner.cleanup()
    log.info("edge stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "certs":
        files = certs.make_all(args.out, args.host, args.worker)
        for name, path in files.items():
            print(f"{name}: {path}", file=sys.stderr)
        return 0
    if args.command in ("keys", "tokens"):
        prefix = auth.CLIENT_KEY_PREFIX if args.command == "keys" else auth.WORKER_TOKEN_PREFIX
        if args.action == "create":
            secret = auth.create(args.file, args.name, prefix, admin=not getattr(args, "no_admin", False),
                                 rate=getattr(args, "rate", None), burst=getattr(args, "burst", None))
            print(secret)
            print(f"stored the hash of {args.name!r} in {args.file}; this secret is shown only once", file=sys.stderr)
        else:
            if not auth.revoke(args.file, args.name):
                print(f"error: no credential named {args.name!r} in {args.file}", file=sys.stderr)
                return 1
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        allocator.pin_mmap_threshold()  # keeps RSS flat under long TLS traffic
        loop.run(serve(config_from_args(args), args.insecure_http), args.loop)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        pass
    return 0
