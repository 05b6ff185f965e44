"""Command line of the edge proxy: `certs`, `keys`, `tokens`, `vpn`, `serve`.
Every option of `serve` also reads an EDGE_* environment variable."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import ssl
import sys
from pathlib import Path

from aiohttp import web

from runtime import allocator, settings
from runtime import eventloop as loop
from runtime.cli import StartupError, run_main, setup_logging
from runtime.tlsread import record_sized_reads

from . import auth, certs, direct_spec, siblings, supervisor, vpn
from .app import drain, make_app
from .config import EdgeConfig
from .direct import DIRECTS

log = logging.getLogger("edge_proxy")
ENV_PREFIX = "EDGE"


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
            kc.add_argument("--admin", action="store_true",
                            help="this key may also read the edge's status (/_edge/metrics, /_edge/workers) and "
                                 "sign in to the inspector /_edge/; without it the key can only send requests")
            kc.add_argument("--no-admin", action="store_true", help=argparse.SUPPRESS)  # the default since issue 19
            kc.add_argument("--rate", type=float, help="requests/s for this key (default: the edge's --rate-limit)")
            kc.add_argument("--burst", type=float, help="burst for this key (default: max(1, rate))")
        kr = ksub.add_parser("revoke", help="remove a secret by name")
        kr.add_argument("--file", required=True)
        kr.add_argument("--name", required=True)

    v = sub.add_parser("vpn", help="write WireGuard configs for the edge and its workers (docs/vpn.md)")
    vsub = v.add_subparsers(dest="action", required=True)
    vi = vsub.add_parser("init", help="write DIR/edge.conf, DIR/worker-K.conf and DIR/vpn.json (keys included)")
    vi.add_argument("--out", required=True, help="new directory for the configs (made 0700, files 0600)")
    vi.add_argument("--endpoint", required=True, help="PUBLIC_HOST:PORT where workers reach the edge over UDP; "
                    "the edge listens on PORT")
    vi.add_argument("--workers", type=int, required=True, help="how many worker configs to write")
    vi.add_argument("--subnet", default=vpn.DEFAULT_SUBNET, help="private network for the tunnel addresses; the "
                    "edge takes the first host address, workers the next ones (default: %(default)s)")
    va = vsub.add_parser("add-worker", help="write one more worker config and add its peer to DIR/edge.conf")
    va.add_argument("dir", help="a directory written by `vpn init`")
    for vp in (vi, va):
        vp.add_argument("--pool", default="default", help="pool named in the printed --direct lines "
                        "(default: %(default)s)")
        vp.add_argument("--worker-port", type=int, default=vpn.DEFAULT_WORKER_PORT,
                        help="port of the worker's inference server in the printed --direct lines "
                        "(default: %(default)s)")

    s = sub.add_parser("serve", help="run the edge", description="Run the edge. Every option also reads the "
                       "environment variable named in its help; a flag beats the variable.")
    settings.add_arguments(s, EdgeConfig, ENV_PREFIX)
    s.add_argument(supervisor.CHILD_FLAG, dest="edge_child", help=argparse.SUPPRESS)  # I,N,DIR: set by the supervisor
    return p


def config_from_args(a: argparse.Namespace) -> EdgeConfig:
    try:
        return settings.resolve(EdgeConfig, ENV_PREFIX, a)
    except settings.SettingError as exc:
        raise StartupError(str(exc)) from None


def server_ssl_context(cfg: EdgeConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    record_sized_reads(ctx)  # no 256 KiB buffer per TLS read (runtime/tlsread.py)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.cert or "", cfg.key)
    except FileNotFoundError as exc:
        raise StartupError(f"certificate file not found ({exc.filename}); create one with "
                         "`edge-proxy certs --out DIR --host NAME` or pass --cert/--key") from None
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"cannot load certificate {cfg.cert} / key {cfg.key}: {exc}; check that they are "
                         "PEM files and that the key matches the certificate") from None
    if cfg.worker_ca:
        try:
            ctx.load_verify_locations(cfg.worker_ca)
        except (ssl.SSLError, OSError) as exc:
            raise StartupError(f"cannot load worker CA {cfg.worker_ca}: {exc}") from None
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def load_secrets(cfg: EdgeConfig) -> tuple[auth.CredentialStore, auth.CredentialStore, ssl.SSLContext | None]:
    """The credential files and the TLS context, or a one-line StartupError."""
    if not cfg.client_keys or not cfg.worker_tokens:
        raise StartupError("--client-keys and --worker-tokens are required; create them with "
                         "`edge-proxy keys create` and `edge-proxy tokens create`")
    try:
        direct_spec.load(cfg.direct, cfg.directs)  # a bad declaration stops the start, not a reload later
    except direct_spec.DirectSpecError as exc:
        raise StartupError(str(exc)) from None
    keys = auth.CredentialStore.load(cfg.client_keys)
    tokens = auth.CredentialStore.load(cfg.worker_tokens)
    return keys, tokens, None if cfg.insecure_http else server_ssl_context(cfg)


async def serve(cfg: EdgeConfig) -> None:
    keys, tokens, ctx = load_secrets(cfg)
    if cfg.insecure_http and cfg.process_index == 0:
        log.warning("serving plain HTTP: only do this behind a TLS-terminating load balancer")
    app = make_app(cfg, keys, tokens)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=cfg.grace,
                           keepalive_timeout=cfg.keepalive_timeout, max_headers=cfg.max_headers,
                           max_field_size=cfg.max_field_size, max_line_size=cfg.max_field_size)
    await runner.setup()
    # Several processes: each its own listening socket on the port; the kernel spreads connections over them.
    site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=ctx, backlog=1024, reuse_address=True,
                       reuse_port=True if cfg.processes > 1 else None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"port {cfg.port} on {cfg.host} is already in use; stop the other process or "
                             "choose another with --listen") from None
        raise StartupError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from None
    sibling_server = await siblings.serve(app) if cfg.processes > 1 else None  # also says "listening" to the supervisor
    scheme = "http" if cfg.insecure_http else "https"
    which = f"process {cfg.process_index} of {cfg.processes} " if cfg.processes > 1 else ""
    log.info("edge %slistening on %s://%s:%d (%d client keys, %d worker tokens)", which, scheme, cfg.host, cfg.port,
             len(keys), len(tokens))
    shown = "THIS-HOST" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    shown = f"[{shown}]" if ":" in shown else shown
    log.info("inspector: %s://%s:%d/_edge/ (sign in with a client key created with `keys create --admin`; %s)",
             "https", shown, cfg.port, f"keeps the last {cfg.inspector_requests} requests"
             if cfg.inspector_requests else "recent requests off")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app[DIRECTS].reload)
    await stop.wait()
    log.info("shutting down: draining for up to %.0f s", cfg.grace)
    await site.stop()  # no new connections
    await drain(app)
    if sibling_server is not None:
        sibling_server.close()
    await runner.cleanup()
    log.info("edge stopped")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run_main(lambda: _command(args, argv))


def _serve_command(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = config_from_args(args)
    if args.edge_child:  # one of the processes of `--processes N`, started by the supervisor
        cfg.process_index, cfg.processes, cfg.runtime_dir = supervisor.parse_child(args.edge_child)
        supervisor.die_with_parent()
        setup_logging(cfg.log_level, tag=f"[{cfg.process_index}]")
    elif cfg.processes > 1:
        setup_logging(cfg.log_level)
        load_secrets(cfg)  # a bad file or port is one line here, not one per process
        supervisor.check_port(cfg)
        return loop.run(supervisor.Supervisor(cfg, argv).run(), cfg.loop)
    else:
        setup_logging(cfg.log_level)
    allocator.pin_mmap_threshold()  # keeps RSS flat under long TLS traffic
    loop.run(serve(cfg), cfg.loop)
    return 0


def _command(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "certs":
        files = certs.make_all(args.out, args.host, args.worker)
        for name, path in files.items():
            print(f"{name}: {path}", file=sys.stderr)
        return 0
    if args.command == "vpn":
        return _vpn(args)
    if args.command in ("keys", "tokens"):
        prefix = auth.CLIENT_KEY_PREFIX if args.command == "keys" else auth.WORKER_TOKEN_PREFIX
        if args.action == "create":
            if getattr(args, "admin", False) and getattr(args, "no_admin", False):
                raise StartupError("--admin and --no-admin contradict each other; keys are not admin unless --admin")
            secret = auth.create(args.file, args.name, prefix, admin=getattr(args, "admin", False),
                                 rate=getattr(args, "rate", None), burst=getattr(args, "burst", None))
            print(secret)
            kind = ("admin client key" if args.admin else "client key (not admin)") if args.command == "keys" \
                else "worker token"
            print(f"stored the hash of {kind} {args.name!r} in {args.file}; this secret is shown only once",
                  file=sys.stderr)
        elif not auth.revoke(args.file, args.name):
            print(f"error: no credential named {args.name!r} in {args.file}", file=sys.stderr)
            return 1
        return 0
    return _serve_command(args, argv)


def _vpn(args: argparse.Namespace) -> int:
    try:
        if args.action == "init":
            directory = Path(args.out)
            state = vpn.init(directory, args.endpoint, args.workers, args.subnet)
            new = state.workers
            print(f"wrote {directory / vpn.EDGE_FILE} (the edge, {state.edge.address}, listening on UDP "
                  f"{state.listen_port})", file=sys.stderr)
        else:
            directory = Path(args.dir)
            state, peer = vpn.add_worker(directory)
            new = [peer]
            print(f"added {peer.name} to {directory / vpn.EDGE_FILE}; reload the edge's interface with "
                  f"`wg syncconf IFACE <(wg-quick strip {directory / vpn.EDGE_FILE})`", file=sys.stderr)
    except vpn.VpnError as exc:
        raise StartupError(str(exc)) from None
    for w in new:
        print(f"wrote {vpn.worker_file(directory, w.name)} ({w.name}, {w.address}): copy it to that worker only",
              file=sys.stderr)
    print("direct workers for the edge: pass these to `edge-proxy serve`, or put them in its --directs file "
          "(docs/vpn.md):", file=sys.stderr)
    for w in new:
        print(vpn.direct_line(w, args.pool, args.worker_port))
    return 0
