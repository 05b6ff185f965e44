"""Matching a stream's answers to its frames (pure): each frame's outcome
(answered, dropped by the server, an error, unanswered), by `seq` when the
answer carries it, else by order."""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

perf = time.perf_counter


# -- matching answers to frames (pure) ----------------------------------------------

PENDING, ANSWERED, DROPPED, ERROR, UNANSWERED = "pending", "answered", "dropped", "error", "unanswered"


class Frame:
    """One frame of one stream. Times are seconds from the run's start."""

    __slots__ = ("stream", "seq", "intended", "sent", "done", "outcome", "error", "timing", "label")

    def __init__(self, stream: int, seq: int, intended: float, sent: float) -> None:
        self.stream = stream
        self.seq = seq
        self.intended = intended
        self.sent = sent
        self.done: float | None = None
        self.outcome = PENDING
        self.error: str | None = None
        self.timing: dict[str, float] | None = None
        self.label: str | None = None

    @property
    def latency_ms(self) -> float | None:
        """Answer arrival minus the SCHEDULED send time (coordinated-omission
        safe); None unless the frame was answered."""
        if self.outcome != ANSWERED or self.done is None:
            return None
        return (self.done - self.intended) * 1000

    @property
    def lag_ms(self) -> float:
        return (self.sent - self.intended) * 1000


def _parse(data: str | bytes) -> dict[str, Any] | None:
    """The answer as a JSON object, or None (a plain echo, a binary frame)."""
    head = data[:1].lstrip() if isinstance(data, str) else data[:16].lstrip()[:1]
    if head not in ("{", b"{"):
        return None
    try:
        v = json.loads(data)
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


def _timing(v: object) -> dict[str, float] | None:
    if not isinstance(v, dict):
        return None
    out = {str(k): float(x) for k, x in v.items() if isinstance(x, int | float) and not isinstance(x, bool)}
    return out or None


class FrameLedger:
    """The frames of one stream and how each ended.

    An answer that is a JSON object with an integer `seq` belongs to that
    frame; any other answer (a plain echo, JSON without `seq`) to the oldest
    frame still waiting. `{"seq": n, "dropped": true}` marks frame n dropped
    by the server, `{"seq": n, "error": ...}` an error. An answer with an
    integer `bytes` (the inference server's transformation streams) is
    followed by that frame's image as one binary message: the frame ends
    when the image arrives. An answer for no waiting frame (an unknown or
    repeated seq, more answers than frames) is counted in `unmatched`."""

    def __init__(self, stream: int) -> None:
        self.stream = stream
        self.frames: list[Frame] = []
        self._waiting: dict[int, Frame] = {}
        self._order: deque[int] = deque()
        self._image_for: Frame | None = None  # announced by its JSON, its binary image still to come
        self.unmatched = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def sent(self, seq: int, intended: float, at: float) -> Frame:
        f = Frame(self.stream, seq, intended, at)
        self.frames.append(f)
        self._waiting[seq] = f
        self._order.append(seq)
        return f

    def _oldest(self) -> Frame | None:
        while self._order:
            seq = self._order.popleft()
            f = self._waiting.pop(seq, None)
            if f is not None:
                return f
        return None

    def answer(self, data: str | bytes, at: float) -> Frame | None:
        """Match one answer received at `at`; the frame it ended, or None."""
        if self._image_for is not None and isinstance(data, bytes):
            imaged, self._image_for = self._image_for, None
            imaged.done = at
            return imaged
        msg = _parse(data)
        seq = msg.get("seq") if msg is not None else None
        if isinstance(seq, int) and not isinstance(seq, bool):
            f = self._waiting.pop(seq, None)
        else:
            f = self._oldest()
        if f is None:
            self.unmatched += 1
            return None
        f.done = at
        if msg is not None and msg.get("dropped") is True:
            f.outcome = DROPPED
        elif msg is not None and msg.get("error") not in (None, False):
            f.outcome = ERROR
            f.error = str(msg["error"])[:200]
        else:
            f.outcome = ANSWERED
            if msg is not None:
                f.timing = _timing(msg.get("timing"))
                label = msg.get("label")
                f.label = str(label) if label is not None else None
                size = msg.get("bytes")
                if isinstance(size, int) and not isinstance(size, bool):
                    self._image_for = f  # not ended until its image is here
                    return None
        return f

    def close(self) -> int:
        """The run is over: every frame still waiting is unanswered."""
        n = 0
        for f in self._waiting.values():
            f.outcome = UNANSWERED
            n += 1
        self._waiting.clear()
        self._order.clear()
        return n
