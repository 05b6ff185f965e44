"""Which kind of request this is, decided once from its path as a server
would resolve it: an edge endpoint (public, admin, the tunnel), the edge's
reserved namespace, a malformed target, or a request to proxy. Pure."""

from __future__ import annotations

import posixpath
import re
from enum import Enum
from urllib.parse import unquote

PUBLIC_PATHS = {"/_edge/health": "health", "/_edge/ready": "ready"}
ADMIN_PATHS = {"/_edge/metrics", "/_edge/workers", "/_edge/", "/_edge", "/_edge/events", "/_edge/api/overview",
               "/_edge/api/requests", "/_edge/logout"}
LOGIN_PATH = "/_edge/login"
STATIC_PREFIX = "/_edge/static/"
TUNNEL_PATH = "/_edge/tunnel"


class Route(Enum):
    HEALTH = "health"  # liveness, no credentials
    READY = "ready"  # readiness, no credentials
    TUNNEL = "tunnel"  # agents dial in here with worker tokens
    ADMIN = "admin"  # status pages and the inspector: an admin client key or a signed-in browser
    LOGIN = "login"  # the inspector's sign-in form and its static files: no credentials
    RESERVED = "reserved"  # anything else under /_edge: never proxied
    BAD_TARGET = "bad_target"  # CONNECT or not origin-form
    PROXY = "proxy"  # everything else: a client key, then a worker


def normalized_path(raw_path: str) -> str:
    """The path as a server would resolve it: percent-decoded, slashes
    merged, dot segments removed. Used only to classify, never to forward."""
    p = unquote(raw_path.split("?", 1)[0], errors="replace")
    p = re.sub(r"/+", "/", p)
    norm = posixpath.normpath(p) if p not in ("", "/") else "/"
    if p.endswith("/") and norm != "/":
        norm += "/"
    return norm if norm.startswith("/") else "/" + norm


def is_public_page(method: str, worker_target: str, public_paths: list[str] | tuple[str, ...]) -> bool:
    """Whether a proxied request may go without a client key: a GET or HEAD
    (never a WebSocket upgrade; the caller checks) whose path at the worker
    (after any `/pools/<name>` prefix; the query string is ignored) is one of
    `public_paths` exactly, spelled plainly (no dot segments, doubled slashes
    or percent-escapes that would resolve to it)."""
    if method not in ("GET", "HEAD") or not public_paths:
        return False
    literal = worker_target.split("?", 1)[0]
    return literal in public_paths and normalized_path(literal) == literal


def classify(method: str, raw_path: str) -> tuple[Route, str]:
    """(route, normalized path) of a request."""
    norm = normalized_path(raw_path)
    literal = raw_path.split("?", 1)[0]
    if raw_path.startswith("/_edge") and norm in PUBLIC_PATHS and method == "GET":
        return (Route.HEALTH if norm == "/_edge/health" else Route.READY), norm
    if literal == TUNNEL_PATH:
        return Route.TUNNEL, norm
    if norm in ADMIN_PATHS and raw_path.startswith("/_edge"):
        return Route.ADMIN, norm
    if raw_path.startswith("/_edge") and (norm == LOGIN_PATH or norm.startswith(STATIC_PREFIX)):
        return Route.LOGIN, norm
    if norm == "/_edge" or norm.startswith("/_edge/"):
        # Whatever its spelling, anything that resolves under /_edge is the edge's own.
        return Route.RESERVED, norm
    if method == "CONNECT" or not raw_path.startswith("/"):
        return Route.BAD_TARGET, norm
    return Route.PROXY, norm
