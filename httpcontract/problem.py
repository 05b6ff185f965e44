"""The one JSON error shape every client-facing error has, at every hop:
RFC 9457 Problem Details (`application/problem+json`) with two members of our
own, a stable machine `code` and the `request_id`:

    {"type": "urn:edge-inference:error:no_worker", "title": "Service Unavailable",
     "status": 503, "code": "no_worker", "detail": "no healthy worker in pool 'gpu'",
     "request_id": "7f3c..."}

Clients branch on `code` (documented in docs/operations.md), show `detail`,
and quote `request_id` when they report a problem. Seed clients of the
inference server also find `"message": "error"` there (see inference)."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:edge-inference:error:"


def title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def body(status: int, code: str, detail: str, request_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """The problem object; `extra` members are added (never replacing ours)."""
    out: dict[str, Any] = {**extra, "type": TYPE_PREFIX + code, "title": title(status), "status": status,
                           "code": code, "detail": detail}
    if request_id:
        out["request_id"] = request_id
    return out


def encode(status: int, code: str, detail: str, request_id: str | None = None, **extra: Any) -> bytes:
    return json.dumps(body(status, code, detail, request_id, **extra)).encode()


def is_problem(obj: object) -> bool:
    """True for a decoded JSON body of this shape (used by tests and clients)."""
    return (isinstance(obj, dict) and isinstance(obj.get("code"), str) and isinstance(obj.get("status"), int)
            and isinstance(obj.get("detail"), str) and str(obj.get("type", "")).startswith(TYPE_PREFIX))
