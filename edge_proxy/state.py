"""The edge's shared state, one per application: its settings, credentials,
worker registry, metrics, rate limiters and the tunnels it holds. Reached by
handlers as `request.app[STATE]`."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from .auth import CredentialStore
from .browser_session import SessionSigner
from .config import EdgeConfig
from .inspector import Inspector
from .metrics import EdgeMetrics
from .ratelimit import RateLimiter
from .registry import Registry, TunnelSession


class OpenWebSocket(Protocol):
    """A client WebSocket being relayed (relay.websocket.WsRelay through a
    tunnel, direct_ws.DirectRelay to a direct worker)."""

    async def shutdown(self, code: int, reason: str) -> None: ...


@dataclass(eq=False)
class EdgeState:
    config: EdgeConfig
    client_keys: CredentialStore
    worker_tokens: CredentialStore
    registry: Registry = field(default_factory=Registry)
    metrics: EdgeMetrics = field(default_factory=EdgeMetrics)
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0, 0))
    auth_failures: RateLimiter = field(default_factory=lambda: RateLimiter(1, 60))
    sessions: set[TunnelSession] = field(default_factory=set)
    websockets: set[OpenWebSocket] = field(default_factory=set)  # open client WebSockets (edge_proxy/websocket.py)
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False
    started: float = field(default_factory=time.time)
    inspector: Inspector = field(default_factory=lambda: Inspector(0, time.monotonic()))
    browser_sessions: SessionSigner = field(default_factory=SessionSigner)  # the inspector's sign-ins


STATE = web.AppKey("state", EdgeState)
