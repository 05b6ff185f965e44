"""What one attempt of a proxied request says about its worker, shared by
both kinds of worker (tunnel: proxy.py, direct: direct_http.py): the
outcome fed to outlier detection and the adaptive limit, and the signal
that a request was never processed and may go to another worker."""

from __future__ import annotations

import enum
from dataclasses import dataclass

NO_BODY_STATUSES = frozenset({204, 304})
# Methods retried after a connection or tunnel was lost mid-request: the
# worker may have processed them, which these methods make harmless.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class RetryElsewhere(Exception):
    """The worker never processed the request: safe to try another."""


class Outcome(enum.Enum):
    """What one attempt says about the worker, for outlier detection and the
    adaptive limit; None where it says nothing (the client's fault)."""

    OK = "ok"
    FAILED = "failed"  # 5xx, timeout, broken response: counts towards ejection
    SHED = "shed"  # 503 + Retry-After or 429: busy, not broken (overload.is_load_signal)


@dataclass(eq=False)
class Waiting:
    """One request waiting for a direct worker's response head (direct.DirectSession.waiting)."""

    abandoned: str = ""  # why the edge stopped waiting (the worker went silent), else empty
