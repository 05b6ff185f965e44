"""Resource samples of local processes for the reliability tools: RSS, open
file descriptors, and the edge's asyncio task count from its metrics."""

from __future__ import annotations

import os
import re


def status_mb(pid: int | str, field: str = "VmRSS") -> float:
    """A memory line of /proc/PID/status in MB: VmRSS (now) or VmHWM (peak).
    `pid` may be "self"."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mb(pid: int) -> float:
    return status_mb(pid, "VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def labelled(text: str, name: str) -> dict[str, float]:
    """Every sample of a metric with one label, as {label value: value}."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{re.escape(name)}{{[^=}}]+="([^"]*)"}} ([0-9.e+-]+)$', text, re.M)}


def grown(before: dict[str, float], after: dict[str, float]) -> str:
    """The labels whose value rose, as "name +n (a -> b)", largest first."""
    rises = sorted(((after[k] - before.get(k, 0), k) for k in after if after[k] > before.get(k, 0)), reverse=True)
    return ", ".join(f"{k} +{d:.0f} ({before.get(k, 0):.0f} -> {after[k]:.0f})" for d, k in rises) or "none"


def heap_trims(text: str) -> str:
    """The edge's malloc_trim runs from its metrics: how many, the mean pause,
    the bucket that bounds the longest one, and the RSS they gave back."""
    n = metric(text, "edge_heap_trim_seconds_count") or 0
    if not n:
        return "none"
    total = metric(text, "edge_heap_trim_seconds_sum") or 0
    bound = next((float(m.group(1)) for m in re.finditer(
        r'^edge_heap_trim_seconds_bucket{le="([0-9.e+-]+)"} ([0-9.e+-]+)$', text, re.M) if float(m.group(2)) >= n),
        float("inf"))
    released = (metric(text, "edge_heap_trim_released_bytes_total") or 0) / 2**20
    return f"{n:.0f}, mean {total / n * 1000:.2f} ms, all <= {bound * 1000:g} ms, {released:.1f} MB released"


def flat(samples: list[float], tolerance: float) -> tuple[bool, float]:
    """Whether the last sample stays within `tolerance` (fraction) of the
    first one after warm-up; returns (ok, relative change)."""
    if len(samples) < 2 or samples[0] == 0:
        return True, 0.0
    change = (samples[-1] - samples[0]) / samples[0]
    return abs(change) <= tolerance, change
