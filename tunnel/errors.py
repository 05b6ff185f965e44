"""Exceptions of the tunnel protocol.

A peer's bad bytes always surface as one `ProtocolError`; misuse of the API by
the local application surfaces as `UsageError`; a stream that ended abnormally
(reset, tunnel gone) as `StreamError`. All are `TunnelError`s.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes carried by RESET and GOAWAY frames (numbered as in HTTP/2)."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    # The stream was not processed at all: no byte reached the upstream, so
    # the edge may safely retry it on another worker.
    REFUSED_STREAM = 7
    CANCEL = 8
    VERSION_MISMATCH = 13
    # (edge, refusing a HELLO) Another live agent process already serves this
    # agent id: the newcomer must not take its place; give it its own id.
    DUPLICATE_ID = 14


class TunnelError(Exception):
    """Base class of every exception raised by the `tunnel` package."""


class ProtocolError(TunnelError):
    """The peer sent something malformed or forbidden; the tunnel must close.

    `code` is the GOAWAY code to send before closing.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class UsageError(TunnelError):
    """The local application called the API in a way the protocol forbids
    (sending on a closed stream, exceeding the send window, ...)."""


class StreamClosedError(UsageError):
    """The stream is closed or was reset; nothing more can be sent on it."""


class StreamError(TunnelError):
    """A stream ended abnormally: reset by the peer, or the tunnel closed.

    `retryable` is true when the peer guarantees it did not process the
    request at all (REFUSED_STREAM, or a stream above a GOAWAY's last id).
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.CANCEL, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
