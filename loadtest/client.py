"""The HTTP client side shared by request runs and stream runs: the timing of
every phase of one request (aiohttp's TraceConfig plus a socket that stamps
its TCP connect), TLS contexts, the sample images, the classification of a
failure into a kind and a sentence, the edge's heartbeat RTT and a
description of the machine. No load model and no statistics here."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import json
import logging
import mimetypes
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
from yarl import URL

from . import __version__

log = logging.getLogger(__name__)

perf = time.perf_counter

SAMPLES = Path(__file__).resolve().parent / "samples"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class UsageError(Exception):
    """A problem with the options or their files, reported as one line."""



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
    """The sentence an error answer carries (the problem's `detail`), or
    the start of its text."""
    text = body[:2000].decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:160]
    if isinstance(data, dict):
        found = [v for k in ("detail", "message", "error") if isinstance(v := data.get(k), str) and v.strip()]
        # A sentence beats a code word: the inference server answers
        # {"message": "error", "error": "model 'x' is not loaded here; ..."}.
        for v in sorted(found, key=lambda v: " " not in v.strip()):
            return v[:160]
    return " ".join(text.split())[:160]


def problem_code(body: bytes) -> str | None:
    """The machine `code` of a problem-details answer (`unknown_pool`,
    `unauthorized`, ...), or None: it names the option to fix exactly."""
    try:
        data = json.loads(body[:2000].decode("utf-8", "replace"))
    except ValueError:
        return None
    code = data.get("code") if isinstance(data, dict) else None
    return code if isinstance(code, str) else None


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


async def edge_tunnel_rtt(session: aiohttp.ClientSession, url: URL, headers: dict[str, str],
                          pool: str | None) -> dict[str, float] | None:
    """The edge's heartbeat RTT per worker, from GET /_edge/workers at the
    origin of `url` (needs a key allowed to read it); None when the URL is
    not an edge. A ws:// or wss:// URL asks its http(s) origin."""
    scheme = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
    origin = url.with_scheme(scheme).origin() / "_edge" / "workers"
    try:
        async with session.get(origin, headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status in (401, 403):
                # Not an error of the run: each answer still carries its own
                # tunnel_rtt; only the per-worker table needs the admin view.
                log.warning("per-worker tunnel RTT not read: %s answered %d (it needs a key with admin rights); "
                            "each response's own tunnel_rtt is still reported", origin, r.status)
                return None
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


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the collection of what the process held before a run out of the
    run (`gc.freeze`): a full collection walks every object of the process,
    150 ms and more when a host process holds TensorFlow, and it stalled the
    pacer mid-run. Objects made during the run are still collected."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
