"""HTTP header rules of the relay, applied at both ends of the tunnel: which
headers are hop-by-hop and never travel through it. Pure functions.
(Server-Timing lives in `httpcontract.timing`.)"""

from __future__ import annotations

from collections.abc import Iterable

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def end_to_end(headers: Iterable[tuple[str, str]], drop: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Headers minus hop-by-hop ones (including those named in Connection) and `drop` (lower-case)."""
    pairs = list(headers)
    named: set[str] = set()
    for name, value in pairs:
        if name.lower() == "connection":
            named.update(t.strip().lower() for t in value.split(","))
    return [(n, v) for n, v in pairs if (ln := n.lower()) not in HOP_BY_HOP and ln not in named and ln not in drop]
