"""What crosses the edge, and how it is rewritten: which pool a request
names, the head a worker sees (the client's credentials and forwarding
headers dropped, the edge's own set), and which response headers the client
gets. Pure functions of a request's headers."""

from __future__ import annotations

import re
from collections.abc import Iterable

from aiohttp import web

from relay.headers import end_to_end
from tunnel import RequestHead

POOL_PREFIX = re.compile(r"^/pools/([A-Za-z0-9][A-Za-z0-9._:-]{0,127})(/.*)?$")
# Headers the edge owns: whatever a client sends under these names is dropped
# and, where it applies, set by the edge itself.
EDGE_OWNED = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "forwarded",
        "x-real-ip",
        "authorization",  # client credentials never travel to workers
        "x-api-key",
        "x-edge-health-check",
        "host",
        "content-length",
        "expect",  # answered by the edge itself (100-continue); the body then streams normally
    }
)
EDGE_OWNED_AND_ID = EDGE_OWNED | {"x-request-id"}  # the edge's own id replaces the client's
RESPONSE_DROP = frozenset({"content-length", "server-timing", "date", "server"})

def resolve_pool(request: web.Request) -> tuple[str, str]:
    """(pool name, target path for the worker) from `/pools/<name>/...` or `X-Pool`."""
    raw = request.raw_path
    m = POOL_PREFIX.match(raw.split("?", 1)[0])
    if m:
        rest = m.group(2) or "/"
        query = raw[len(raw.split("?", 1)[0]) :]
        return m.group(1), rest + query
    return request.headers.get("X-Pool", "default"), raw


def undecodable_header(headers: Iterable[tuple[str, str]]) -> str | None:
    """The name of the first header whose value is not valid UTF-8 (aiohttp
    keeps such bytes as surrogate escapes, which no HTTP client can send on)."""
    for name, value in headers:
        # isascii() is the fast common case; only non-ASCII values are scanned.
        if not value.isascii() and any("\udc80" <= c <= "\udcff" for c in value):
            return name
    return None


def request_head(request: web.Request, target: str, request_id: str) -> RequestHead:
    headers = end_to_end(request.headers.items(), EDGE_OWNED_AND_ID)
    host = request.headers.get("Host", "")
    headers.append(("Host", host))
    headers.append(("X-Forwarded-For", request.remote or ""))
    headers.append(("X-Forwarded-Proto", request.scheme))
    if host:
        headers.append(("X-Forwarded-Host", host))
    headers.append(("X-Request-ID", request_id))
    if request.content_length is not None:
        headers.append(("Content-Length", str(request.content_length)))
    elif request.body_exists:
        headers.append(("Transfer-Encoding", "chunked"))
    return RequestHead(request.method, target, tuple(headers))
