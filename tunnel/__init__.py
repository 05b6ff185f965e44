"""The tunnel wire protocol shared by the edge and the worker agent.

Sans-I/O: `Connection` takes bytes and returns events, takes calls and queues
bytes; it never touches a socket, an event loop or a clock. See docs/protocol.md.
"""

from .connection import Connection, Role, State
from .errors import (
    ErrorCode,
    ProtocolError,
    StreamClosedError,
    StreamError,
    TunnelError,
    UsageError,
)
from .events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HelloReceived,
    PongReceived,
    RequestReceived,
    ResponseReceived,
    StatusReceived,
    StreamReset,
    WelcomeReceived,
    WindowUpdated,
)
from .frames import FrameDecoder, FrameType, RequestHead, ResponseHead
from .handshake import PROTOCOL_VERSIONS, Hello, PeerSettings, Welcome, WorkerStatus
from .heartbeat import Heartbeat

__all__ = [
    "PROTOCOL_VERSIONS",
    "Connection",
    "DataReceived",
    "ErrorCode",
    "Event",
    "FrameDecoder",
    "FrameType",
    "GoAwayReceived",
    "Heartbeat",
    "Hello",
    "HelloReceived",
    "PeerSettings",
    "PongReceived",
    "ProtocolError",
    "RequestHead",
    "RequestReceived",
    "ResponseHead",
    "ResponseReceived",
    "Role",
    "State",
    "StatusReceived",
    "StreamClosedError",
    "StreamError",
    "StreamReset",
    "TunnelError",
    "UsageError",
    "Welcome",
    "WelcomeReceived",
    "WindowUpdated",
    "WorkerStatus",
]
