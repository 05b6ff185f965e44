"""`X-Request-ID`: every hop passes a client's id on when it is a plain token
(so it is safe in logs and headers) and makes a new one otherwise."""

from __future__ import annotations

import os
import re

HEADER = "X-Request-ID"
PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def is_valid(value: str) -> bool:
    return PATTERN.fullmatch(value) is not None


def accept(value: str | None) -> str:
    """The id to use for a request that presented `value` (or none)."""
    return value if value and is_valid(value) else new()


def new() -> str:
    """32 random hex digits (the length of a uuid4's hex; without building a UUID object per request)."""
    return os.urandom(16).hex()
