"""Drives the load: the open loop (fixed or Poisson arrivals, latency from
the intended send time), the closed loop (fixed concurrency) and the sweep
over rates. The client's timing, TLS and error kinds are in `client`.

A run produces one `Record` per request; `report.analyse` turns them into
statistics. Nothing here computes percentiles.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from . import __version__
from .client import (
    _CURRENT,
    IMAGE_SUFFIXES,
    SAMPLES,
    RequestTiming,
    UsageError,
    _detail,
    _error_kind,
    _socket_factory,
    edge_tunnel_rtt,
    frozen_heap,
    load_images,
    machine,
    problem_code,
    tls_context,
    trace_config,
)
from .schedule import Pacer, arrival_offsets, wait_plan

# What other modules import from here, some of it living in `client` since the
# split (kept importable from here for the code written before it).
__all__ = ["IMAGE_SUFFIXES", "SAMPLES", "FAIL_FAST_AFTER", "Progress", "Record", "RequestTiming", "Run", "RunConfig",
           "UsageError", "edge_tunnel_rtt", "install_stop_on_signals", "load_images", "machine", "ssl_context",
           "tls_context", "trace_config"]

perf = time.perf_counter


# Stop early when this many requests have completed and none succeeded
# (unless --keep-going): a wrong key or URL should not take the whole run.
FAIL_FAST_AFTER = 10


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


def ssl_context(cfg: RunConfig) -> ssl.SSLContext | bool:
    return tls_context(cfg.ca, cfg.insecure)


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
        self.codes: dict[str, str] = {}  # error kind -> the answer's problem `code`
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
            with frozen_heap():
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
                code = problem_code(body)
                if code:
                    self.codes[rec.error] = code
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


def install_stop_on_signals(stop: asyncio.Event) -> None:
    """Ctrl-C / SIGTERM end the run and still report what was measured."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass


