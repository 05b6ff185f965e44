"""`Server-Timing` (W3C Server Timing): how a hop writes its entries, how the
next hop merges them with its own, and how the load tester reads them back.
Durations are milliseconds measured on one host's monotonic clock."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

HEADER = "Server-Timing"


def entry(name: str, seconds: float) -> str:
    """One entry, `name;dur=<ms>` with microsecond resolution."""
    return f"{name};dur={seconds * 1000:.3f}"


def entries(pairs: Iterable[tuple[str, float]]) -> str:
    """A whole header value from (name, seconds) pairs, in order."""
    return ", ".join(entry(n, s) for n, s in pairs)


def merge(existing: Iterable[str], *more: str) -> str:
    """The header value a hop sends on: the inner hops' values (one or more
    header lines), then its own entries (the outer hop's come last)."""
    parts = [v.strip() for v in existing if v.strip()]
    parts.extend(more)
    return ", ".join(parts)


def values(headers: Iterable[tuple[str, str]]) -> list[str]:
    """Every Server-Timing value among (name, value) header pairs."""
    return [v for n, v in headers if n.lower() == "server-timing"]


_ENTRY_DUR = re.compile(r"(?:^|,)\s*([^\s,;=]+)\s*;[^,]*?(?<![^\s;])dur\s*=\s*([0-9.eE+-]+)\s*(?=[,;]|$)",
                        re.IGNORECASE)


def parse(header_values: Iterable[str]) -> dict[str, float]:
    """name -> dur (ms) from one or more header values (`name;dur=12.3;desc="..."`,
    comma separated). Entries without a finite numeric dur are skipped; when a
    name repeats, the last wins (an outer hop appends after the inner ones)."""
    out: dict[str, float] = {}
    for value in header_values:
        if '"' not in value:
            # The common case in one regex pass: a name, then within the same
            # entry (no comma) a dur parameter.
            for name, dur in _ENTRY_DUR.findall(value):
                try:
                    d = float(dur)
                except ValueError:
                    continue
                if math.isfinite(d):
                    out[name] = d
            continue
        # Quotes (in desc="...") may hide commas and semicolons: split with care.
        for item in _split_entries(value):
            name, _, params = item.partition(";")
            name = name.strip()
            if not name or "dur" not in params.lower():
                continue
            for param in params.split(";"):
                key, _, val = param.strip().partition("=")
                if key.strip().lower() == "dur":
                    try:
                        d = float(val.strip().strip('"'))
                    except ValueError:
                        break
                    if math.isfinite(d):
                        out[name] = d
                    break
    return out


def _split_entries(value: str) -> Sequence[str]:
    out, buf, quoted, escaped = [], [], False, False
    for ch in value:
        if escaped:
            buf.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            buf.append(ch)
            escaped = True
        elif ch == '"':
            buf.append(ch)
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    out.append("".join(buf))
    return out
