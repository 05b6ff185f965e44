"""Frame scheduling of one `GET /stream` connection, sans-I/O: which frame runs
next, which are skipped under the drop policy, and the order answers leave in.
No sockets, no event loop, no clock; `inference/stream.py` is the asyncio shell.

Every message of a connection gets the next `seq` (0, 1, 2, ...). At most one
frame per connection is being classified at a time (its answer must come
before the next frame's, and real-time clients want the freshest frame, not a
pipeline of stale ones). Answers are released strictly in `seq` order: an
answer that is ready early (a drop, an error) waits for the earlier frame
still in flight.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class DropPolicy(enum.Enum):
    """`latest`: a frame still waiting when a newer one arrives is skipped
    (answered `dropped`), so the model always works on the newest frame.
    `none`: every frame is classified, in order; the connection stops reading
    while `max_waiting` frames wait (TCP then slows the sender)."""
    LATEST = "latest"
    NONE = "none"


class SchedulerError(Exception):
    """The shell called the scheduler out of turn (a bug, never a client's doing)."""


@dataclass(frozen=True)
class Outcome:
    """How a frame was answered; the counts a connection reports."""
    answered: int = 0
    dropped: int = 0
    errors: int = 0


class FrameScheduler(Generic[T]):
    """One connection's frames.

    - `frame(payload)`: a frame arrived; returns its seq.
    - `reject(reason)`: a message that is answered with an error at once
      (a text message, an oversized frame); returns its seq.
    - `next_frame()`: the (seq, payload) to classify now, or None (one at a time).
    - `finished(seq, answer)` / `failed(seq, reason)`: the frame in flight is done.
    - `pop_answer()`: the next answer to send, in seq order, or None.

    Bounds (memory per connection), both enforced by the shell:
    - `max_waiting`: frames held for classification. With `latest` at most
      one frame ever waits; with `none` the shell stops reading while
      `can_accept()` is false.
    - `max_unsent`: answers held back behind the frame in flight (the shell
      also stops reading at that many), and answers released but not taken
      by the writer: past it, `overloaded()` says the client is not reading
      and must be disconnected.
    """

    def __init__(self, drop: DropPolicy, max_waiting: int = 64, max_unsent: int = 64) -> None:
        if max_waiting < 1 or max_unsent < 1:
            raise ValueError("max_waiting and max_unsent must be at least 1")
        self.drop = drop
        self.max_waiting = max_waiting
        self.max_unsent = max_unsent
        self._next_seq = 0
        self._waiting: collections.deque[tuple[int, T]] = collections.deque()
        self._in_flight: int | None = None
        self._ready: dict[int, dict[str, Any]] = {}  # seq -> answer, not yet released
        self._next_to_send = 0
        self._answered = self._dropped = self._errors = 0

    # ------------------------------------------------------------- input

    def frame(self, payload: T) -> int:
        seq = self._take_seq()
        if self.drop is DropPolicy.LATEST:
            while self._waiting:
                old, _ = self._waiting.popleft()
                self._answer(old, {"seq": old, "dropped": True})
                self._dropped += 1
        elif len(self._waiting) >= self.max_waiting:
            raise SchedulerError(f"{len(self._waiting)} frames already wait; stop reading while can_accept() is false")
        self._waiting.append((seq, payload))
        return seq

    def reject(self, reason: str) -> int:
        seq = self._take_seq()
        self._answer(seq, {"seq": seq, "error": reason})
        self._errors += 1
        return seq

    def can_accept(self) -> bool:
        """False while the shell must not read another message."""
        if self.held >= self.max_unsent:
            return False
        return self.drop is DropPolicy.LATEST or len(self._waiting) < self.max_waiting

    # ------------------------------------------------------------- work

    def next_frame(self) -> tuple[int, T] | None:
        if self._in_flight is not None or not self._waiting:
            return None
        seq, payload = self._waiting.popleft()
        self._in_flight = seq
        return seq, payload

    def finished(self, seq: int, answer: dict[str, Any]) -> None:
        self._end(seq)
        self._answer(seq, {"seq": seq, **answer})
        self._answered += 1

    def failed(self, seq: int, reason: str) -> None:
        self._end(seq)
        self._answer(seq, {"seq": seq, "error": reason})
        self._errors += 1

    # ------------------------------------------------------------- output

    def pop_answer(self) -> dict[str, Any] | None:
        answer = self._ready.pop(self._next_to_send, None)
        if answer is not None:
            self._next_to_send += 1
        return answer

    def overloaded(self) -> bool:
        """More answers are free to go than `max_unsent` and the writer has not
        taken them: the client is not reading."""
        return self.releasable > self.max_unsent

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int | None:
        return self._in_flight

    @property
    def unsent(self) -> int:
        """Answers produced and not yet taken by the writer."""
        return len(self._ready)

    @property
    def releasable(self) -> int:
        """Answers `pop_answer()` would return now, one after the other."""
        n = 0
        while self._next_to_send + n in self._ready:
            n += 1
        return n

    @property
    def held(self) -> int:
        """Answers ready but waiting behind the frame in flight."""
        return len(self._ready) - self.releasable

    @property
    def received(self) -> int:
        return self._next_seq

    def idle(self) -> bool:
        """Every message received so far has been answered and taken by the writer."""
        return self._next_to_send == self._next_seq

    def outcome(self) -> Outcome:
        return Outcome(self._answered, self._dropped, self._errors)

    # ------------------------------------------------------------- inside

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _end(self, seq: int) -> None:
        if self._in_flight != seq:
            raise SchedulerError(f"frame {seq} finished but {self._in_flight} is in flight")
        self._in_flight = None

    def _answer(self, seq: int, answer: dict[str, Any]) -> None:
        self._ready[seq] = answer
