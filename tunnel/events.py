"""Events the tunnel connection reports to the application: small immutable
records, one per thing that happened on the wire."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ErrorCode
from .frames import RequestHead, ResponseHead
from .handshake import Hello, Welcome, WorkerStatus


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """(edge) An agent introduced itself; answer with `accept()` or `reject()`."""

    hello: Hello


@dataclass(frozen=True, slots=True)
class WelcomeReceived:
    """(agent) The edge accepted the tunnel."""

    welcome: Welcome


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """(agent) A new stream carrying a request head."""

    stream_id: int
    head: RequestHead
    end_stream: bool


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """(edge) The response head of a stream."""

    stream_id: int
    head: ResponseHead
    end_stream: bool


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Body bytes. The application must call `acknowledge_received(stream_id,
    len(data))` once it has consumed them, or the peer runs out of credit."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer cancelled the stream; it is closed and its credit is freed."""

    stream_id: int
    code: ErrorCode
    reason: str


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """More send credit on a stream (or on the connection, stream_id 0)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The answer to our `ping(timestamp)`: RTT = now - timestamp."""

    timestamp: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer is draining: no new streams. Streams above `last_stream_id`
    were never processed and may be retried elsewhere."""

    last_stream_id: int
    code: ErrorCode
    reason: str


@dataclass(frozen=True, slots=True)
class StatusReceived:
    """(edge) The agent's report on its upstream's health."""

    status: WorkerStatus


Event = (
    HelloReceived
    | WelcomeReceived
    | RequestReceived
    | ResponseReceived
    | DataReceived
    | StreamReset
    | WindowUpdated
    | PongReceived
    | GoAwayReceived
    | StatusReceived
)
