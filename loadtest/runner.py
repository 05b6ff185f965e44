"""Drives the load: an aiohttp client whose TraceConfig times every phase,
the open loop (fixed or Poisson arrivals, latency from the intended send
time), the closed loop (fixed concurrency) and the sweep over rates.

A run produces one `Record` per request; `report.analyse` turns them into
statistics. Nothing here computes percentiles.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import mimetypes
import os
import signal
import socket
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
from yarl import URL

from . import __version__
from .schedule import Pacer, arrival_offsets, wait_plan

perf = time.perf_counter

SAMPLES = Path(__file__).resolve().parent / "samples"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Stop early when this many requests have completed and none succeeded
# (unless --keep-going): a wrong key or URL should not take the whole run.
FAIL_FAST_AFTER = 10


class UsageError(Exception):
    """A problem with the options or their files, reported as one line."""


@dataclass
class RunConfig:
    """Everything that defines a run; stored in the JSON as `config`."""

    command: str = "ping"  # ping: GET the URL; classify: POST images
    url: str = ""
    api_key: str | None = field(default=None, repr=False)
    ca: str | None = None
    pool: str | None = None
    insecure: bool = False
    rate: float | None = None  # open loop, requests/s
    arrivals: str = "fixed"
    concurrency: int | None = None  # closed loop
    duration: float | None = None  # measured seconds, after the warm-up
    requests: int | None = None  # measured requests, after the warm-up
    warmup: float = 1.0
    timeout: float = 30.0
    connections: int | None = None  # client pool size; None: 100 open loop, = concurrency closed loop
    images: str | None = None
    seed: int = 1
    late_ms: float = 1.0
    windows: int = 5
    keep_going: bool = False
    sweep: list[float] | None = None
    label: str | None = None
    protocol: str = "photo"  # classify: "photo" (raw image body) or "oip" (loadtest/oip.py)
    model: str | None = None  # classify --protocol oip: the model's name

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency else "open"

    def pool_size(self) -> int:
        if self.connections is not None:
            return self.connections
        return self.concurrency if self.concurrency else 100

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["api_key"] = "(set)" if self.api_key else None
        d["mode"] = self.mode
        d["connections"] = self.pool_size()
        return d


class RequestTiming:
    """perf_counter() stamps of one request, filled by the trace callbacks."""

    __slots__ = ("start", "queued_start", "queued_end", "create_start", "create_end", "dns_start", "dns_end",
                 "tcp_connected", "reused", "headers_sent", "body_sent", "response_start", "done", "https")

    def __init__(self) -> None:
        none: float | None = None
        self.start = self.queued_start = self.queued_end = self.create_start = self.create_end = none
        self.dns_start = self.dns_end = self.tcp_connected = self.reused = none
        self.headers_sent = self.body_sent = self.response_start = self.done = none
        self.https = False

    def phases(self) -> dict[str, float]:
        """Client phases in ms: queue (waiting for a pooled connection), dns,
        connect (TCP), tls (handshake), send (request written), ttfb (written
        -> response head parsed), body (head -> body read), total (the
        request's own time: start -> body read, minus the pool queue)."""
        ms: dict[str, float] = {}
        start, done = self.start, self.done
        if start is None or done is None:
            return ms
        queue = 0.0
        if self.queued_start is not None and self.queued_end is not None:
            queue = self.queued_end - self.queued_start
            ms["client_queue"] = queue * 1000
        if self.dns_start is not None and self.dns_end is not None:
            ms["client_dns"] = (self.dns_end - self.dns_start) * 1000
        ready = max(t for t in (start, self.queued_end, self.reused, self.create_end) if t is not None)
        if self.create_start is not None and self.create_end is not None:
            begin = self.dns_end if self.dns_end is not None else self.create_start
            if self.https and self.tcp_connected is not None:
                ms["client_connect"] = max(0.0, self.tcp_connected - begin) * 1000
                ms["client_tls"] = max(0.0, self.create_end - self.tcp_connected) * 1000
            else:
                ms["client_connect"] = max(0.0, self.create_end - begin) * 1000
        sent = self.body_sent if self.body_sent is not None else self.headers_sent
        if sent is not None:
            ms["client_send"] = max(0.0, sent - ready) * 1000
        if self.response_start is not None:
            ms["client_ttfb"] = max(0.0, self.response_start - (sent if sent is not None else ready)) * 1000
            ms["client_body"] = max(0.0, done - self.response_start) * 1000
        ms["client_total"] = max(0.0, done - start - queue) * 1000
        return ms


class Record:
    """One request. Times are seconds from the run's start."""

    __slots__ = ("seq", "intended", "sent", "done", "status", "error", "ok", "timing", "server_timing", "label",
                 "warmup", "hops")

    def __init__(self, seq: int, intended: float, warmup: bool) -> None:
        self.seq = seq
        self.intended = intended
        self.sent = intended
        self.done = intended
        self.status = 0
        self.error: str | None = None
        self.ok = False
        self.timing: RequestTiming | None = None
        self.server_timing: str | None = None
        self.label: str | None = None
        self.warmup = warmup
        self.hops: dict[str, float] | None = None  # computed after the run, by report.record_hops

    @property
    def latency_ms(self) -> float:
        """From the intended send time (coordinated-omission safe)."""
        return (self.done - self.intended) * 1000

    @property
    def service_ms(self) -> float:
        """From the actual send."""
        return (self.done - self.sent) * 1000

    @property
    def lag_ms(self) -> float:
        return (self.sent - self.intended) * 1000


# The timing of the request whose connection is being made: the socket
# factory runs inside the request's task, so a context variable finds it.
_CURRENT: contextvars.ContextVar[RequestTiming | None] = contextvars.ContextVar("loadtest_timing", default=None)


class _TimedSocket(socket.socket):
    """A socket that stamps when its TCP connect completed, splitting aiohttp's
    one `connection_create` span into connect and TLS."""

    timing: RequestTiming | None = None

    def connect(self, address: Any) -> None:
        super().connect(address)  # BlockingIOError: completion is seen in getsockopt
        self._stamp()

    def getsockopt(self, *args: Any) -> Any:
        value = super().getsockopt(*args)
        if args[:2] == (socket.SOL_SOCKET, socket.SO_ERROR) and value == 0:
            self._stamp()
        return value

    def _stamp(self) -> None:
        t = self.timing
        if t is not None and t.tcp_connected is None:
            t.tcp_connected = perf()


def _socket_factory(addr_info: Any) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    s = _TimedSocket(family=family, type=type_, proto=proto)
    s.timing = _CURRENT.get()
    return s


def _stamp(attr: str) -> Callable[..., Any]:
    async def on_event(session: Any, ctx: SimpleNamespace, params: Any) -> None:
        t = ctx.trace_request_ctx
        if t is not None:
            setattr(t, attr, perf())
    return on_event


def trace_config() -> aiohttp.TraceConfig:
    tc = aiohttp.TraceConfig()
    tc.on_request_start.append(_stamp("start"))
    tc.on_connection_queued_start.append(_stamp("queued_start"))
    tc.on_connection_queued_end.append(_stamp("queued_end"))
    tc.on_connection_create_start.append(_stamp("create_start"))
    tc.on_connection_create_end.append(_stamp("create_end"))
    tc.on_connection_reuseconn.append(_stamp("reused"))
    tc.on_dns_resolvehost_start.append(_stamp("dns_start"))
    tc.on_dns_resolvehost_end.append(_stamp("dns_end"))
    tc.on_request_headers_sent.append(_stamp("headers_sent"))
    tc.on_request_chunk_sent.append(_stamp("body_sent"))
    tc.on_request_end.append(_stamp("response_start"))
    return tc


def ssl_context(cfg: RunConfig) -> ssl.SSLContext | bool:
    return tls_context(cfg.ca, cfg.insecure)


def tls_context(ca: str | None, insecure: bool) -> ssl.SSLContext | bool:
    """aiohttp's `ssl=`: no verification (--insecure), the given CA, or the system's trust store."""
    if insecure:
        return False
    if ca:
        try:
            return ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load the CA file {ca}: {exc}") from None
    return True


def load_images(directory: str | None) -> list[tuple[str, bytes, str]]:
    """(name, bytes, content type) of every image in `directory`, or of the
    built-in sample photos."""
    d = Path(directory) if directory else SAMPLES
    if not d.is_dir():
        raise UsageError(f"--images {d}: not a directory")
    out = []
    for p in sorted(d.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            out.append((p.name, p.read_bytes(), mimetypes.guess_type(p.name)[0] or "application/octet-stream"))
    if not out:
        raise UsageError(f"--images {d}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return out


def _detail(body: bytes) -> str:
    """The sentence an error answer carries (the edge's JSON `detail`), or
    the start of its text."""
    text = body[:2000].decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:160]
    if isinstance(data, dict):
        for k in ("detail", "message", "error"):
            v = data.get(k)
            if isinstance(v, str):
                return v[:160]
    return " ".join(text.split())[:160]


def _error_kind(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError)):
        inner = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or exc
        verify = getattr(inner, "verify_message", None)
        if verify:
            return "tls", f"certificate verify failed: {verify}"
        return "tls", str(getattr(inner, "reason", None) or inner)
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        if isinstance(errno, int) and errno > 0:
            return "connect", f"{os.strerror(errno)} ({exc.host}:{exc.port})"
        return "connect", exc.strerror or str(exc.os_error)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout", "no complete answer in time"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected", "the server closed the connection before answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "truncated", str(exc) or "the response body broke off"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "bad response", exc.message or str(exc)
    if isinstance(exc, aiohttp.ClientError | OSError):
        return exc.__class__.__name__, str(exc) or exc.__class__.__name__
    return exc.__class__.__name__, str(exc)


@dataclass
class Progress:
    """What the live display shows; updated by the run, read by cli."""

    elapsed: float = 0.0
    planned: float | None = None  # seconds, when known
    planned_requests: int | None = None
    completed: int = 0
    ok: int = 0
    errors: int = 0
    recent: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=20000))  # (done, latency)


class Run:
    """One load run at one rate or concurrency. `execute()` returns records."""

    def __init__(self, cfg: RunConfig, stop: asyncio.Event | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or asyncio.Event()
        self.records: list[Record] = []
        self.details: dict[str, str] = {}
        self.progress = Progress()
        self.aborted: str | None = None
        self.cancelled_in_flight = 0
        self._busy_workers = 0  # closed loop: workers inside a request
        self.run_id = uuid.uuid4().hex[:8]
        self.t0 = 0.0
        self.wall_start = 0.0
        self.tunnel_rtt_ms: dict[str, float] | None = None
        self.images = load_images(cfg.images) if cfg.command == "classify" else []
        try:
            url = URL(cfg.url)
        except ValueError as exc:
            raise UsageError(f"--url {cfg.url!r} is not a valid URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise UsageError(f"--url {cfg.url!r}: need an http:// or https:// URL with a host")
        self.url = url
        self.method = "POST" if cfg.command == "classify" else "GET"
        self.headers: dict[str, str] = {"User-Agent": f"loadtest/{__version__}"}
        if cfg.api_key:
            self.headers["Authorization"] = f"Bearer {cfg.api_key}"
        if cfg.pool:
            self.headers["X-Pool"] = cfg.pool
        self._ssl = ssl_context(cfg)
        self._https = url.scheme == "https"
        self.session: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=self._ssl, limit=self.cfg.pool_size(), limit_per_host=0,
                                         socket_factory=_socket_factory)
        return aiohttp.ClientSession(connector=connector, trace_configs=[trace_config()],
                                     timeout=aiohttp.ClientTimeout(total=self.cfg.timeout), auto_decompress=False)

    async def execute(self) -> list[Record]:
        self.session = self._session()
        self.wall_start = time.time()
        try:
            if self.cfg.mode == "open":
                await self._open_loop()
            else:
                await self._closed_loop()
            if self.cfg.api_key and not self.stop.is_set():
                self.tunnel_rtt_ms = await self._tunnel_rtt()
        finally:
            await self.session.close()
        return self.records

    # -- one request --------------------------------------------------------

    async def _one(self, seq: int, intended: float, warmup: bool) -> None:
        rec = Record(seq, intended, warmup)
        t = RequestTiming()
        t.https = self._https
        rec.timing = t
        _CURRENT.set(t)
        headers = dict(self.headers)
        headers["X-Request-ID"] = f"lt-{self.run_id}-{seq}"
        data = None
        if self.images:
            _, data, ctype = self.images[seq % len(self.images)]
            headers["Content-Type"] = ctype
        assert self.session is not None
        rec.sent = perf() - self.t0
        try:
            async with self.session.request(self.method, self.url, data=data, headers=headers,
                                            allow_redirects=False, trace_request_ctx=t) as r:
                body = await r.read()
                t.done = now = perf()
                rec.done = now - self.t0
                rec.status = r.status
                st = r.headers.getall("Server-Timing", ())
                if st:
                    rec.server_timing = ", ".join(st)
                self._check(rec, r, body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is a counted record, never a traceback
            rec.done = perf() - self.t0
            kind, detail = _error_kind(exc)
            rec.error = kind
            self.details.setdefault(kind, detail)
        self._complete(rec)

    def _check(self, rec: Record, r: aiohttp.ClientResponse, body: bytes) -> None:
        if r.status >= 400 or (self.cfg.command == "classify" and r.status != 200):
            rec.error = f"HTTP {r.status}"
            if rec.error not in self.details:
                self.details[rec.error] = f"{r.reason or ''}: {_detail(body)}".strip(": ")
            return
        if self.cfg.command == "classify":
            try:
                answer = json.loads(body)
            except ValueError:
                answer = None
            if not isinstance(answer, dict) or answer.get("message") != "success" or "label" not in answer:
                rec.error = "bad answer"
                self.details.setdefault("bad answer", "not the inference server's JSON (label, message): "
                                        + " ".join(body[:120].decode("utf-8", "replace").split()))
                return
            rec.label = str(answer["label"])
        rec.ok = True

    def _complete(self, rec: Record) -> None:
        self.records.append(rec)
        p = self.progress
        p.completed += 1
        if rec.ok:
            p.ok += 1
            p.recent.append((rec.done, rec.latency_ms))
        else:
            p.errors += 1
        if (not self.cfg.keep_going and p.ok == 0 and p.completed >= FAIL_FAST_AFTER
                and not self.stop.is_set()):
            self.aborted = f"stopped early: the first {p.completed} requests all failed"
            self.stop.set()

    # -- load models ----------------------------------------------------------

    def _plan(self) -> None:
        cfg, p = self.cfg, self.progress
        if cfg.duration is not None:
            p.planned = cfg.warmup + cfg.duration
        elif cfg.rate and cfg.requests is not None:
            p.planned = cfg.warmup + cfg.requests / cfg.rate
        p.planned_requests = cfg.requests

    async def _open_loop(self) -> None:
        cfg = self.cfg
        assert cfg.rate is not None
        end = cfg.warmup + cfg.duration if cfg.duration is not None else None
        pacer = Pacer(arrival_offsets(cfg.rate, cfg.arrivals, cfg.seed), end=end, count=cfg.requests,
                      count_from=cfg.warmup)
        self._plan()
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        self.t0 = perf()
        while not self.stop.is_set():
            now = perf() - self.t0
            self.progress.elapsed = now
            due, wait = pacer.poll(now)
            for seq, intended in due:
                task = loop.create_task(self._one(seq, intended, intended < cfg.warmup))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if wait is None:
                break
            # Sleep on a timer until just before the next send, then yield
            # to the loop until it is due (see schedule.SPIN_S).
            await asyncio.sleep(min(wait_plan(wait), 0.1))
        await self._drain(tasks)

    async def _closed_loop(self) -> None:
        cfg = self.cfg
        assert cfg.concurrency
        end = cfg.warmup + cfg.duration if cfg.duration is not None else None
        self._plan()
        counter = {"seq": 0, "measured": 0}

        async def worker() -> None:
            while not self.stop.is_set():
                now = perf() - self.t0
                if end is not None and now >= end:
                    return
                warm = now < cfg.warmup
                if cfg.requests is not None and not warm:
                    if counter["measured"] >= cfg.requests:
                        return
                    counter["measured"] += 1
                seq = counter["seq"]
                counter["seq"] += 1
                self._busy_workers += 1
                try:
                    await self._one(seq, now, warm)
                finally:
                    self._busy_workers -= 1

        self.t0 = perf()
        tasks = {asyncio.get_running_loop().create_task(worker()) for _ in range(cfg.concurrency)}
        ticker = asyncio.get_running_loop().create_task(self._tick())
        try:
            await self._drain(tasks)
        finally:
            ticker.cancel()

    async def _tick(self) -> None:
        while True:
            self.progress.elapsed = perf() - self.t0
            await asyncio.sleep(0.1)

    async def _drain(self, tasks: set[asyncio.Task[None]]) -> None:
        """Wait for what is in flight (each request has its timeout); on a
        stop (Ctrl-C, fail-fast) cancel it instead and count it."""
        tasks = set(tasks)
        while tasks and not self.stop.is_set():
            _, tasks = await asyncio.wait(tasks, timeout=0.1)
            self.progress.elapsed = perf() - self.t0
        if tasks:
            # Open loop: each task is one request. Closed loop: each task is a
            # worker, and only those inside a request had one in flight.
            in_flight = len(tasks) if self.cfg.mode == "open" else self._busy_workers
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.cancelled_in_flight = in_flight

    async def _tunnel_rtt(self) -> dict[str, float] | None:
        assert self.session is not None
        return await edge_tunnel_rtt(self.session, self.url, self.headers, self.cfg.pool)


async def edge_tunnel_rtt(session: aiohttp.ClientSession, url: URL, headers: dict[str, str],
                          pool: str | None) -> dict[str, float] | None:
    """The edge's heartbeat RTT per worker, from GET /_edge/workers at the
    origin of `url` (needs a key allowed to read it); None when the URL is
    not an edge. A ws:// or wss:// URL asks its http(s) origin."""
    scheme = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
    origin = url.with_scheme(scheme).origin() / "_edge" / "workers"
    try:
        async with session.get(origin, headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status != 200:
                return None
            data = json.loads(await r.read())
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("workers"), list):
        return None
    out = {}
    for w in data["workers"]:
        if isinstance(w, dict) and isinstance(w.get("tunnel_rtt_ms"), int | float):
            if pool and w.get("pool") not in (None, pool):
                continue
            out[str(w.get("id", "?"))] = float(w["tunnel_rtt_ms"])
    return out or None


def install_stop_on_signals(stop: asyncio.Event) -> None:
    """Ctrl-C / SIGTERM end the run and still report what was measured."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass


def machine() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "loadtest": __version__,
        "cpus": os.cpu_count(),
    }
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info
