"""The per-connection frame scheduler of GET /stream (pure, no I/O): seq
numbering, the drop policies, answer order and the bounds."""

from __future__ import annotations

import pytest

from inference.frames import DropPolicy, FrameScheduler, Outcome, SchedulerError

LATEST, NONE = DropPolicy.LATEST, DropPolicy.NONE


def drain(s: FrameScheduler[str]) -> list[dict]:
    out = []
    while (a := s.pop_answer()) is not None:
        out.append(a)
    return out


def run(s: FrameScheduler[str], script: str) -> list[str]:
    """Drive a scheduler with a tiny script, return what was sent, in order.
    F = frame arrives, T = text message (rejected), R = the frame in flight
    finishes (if one is), S = the model starts the next frame if it is free."""
    sent: list[str] = []
    for op in script:
        if op == "F":
            s.frame(f"f{s.received}")
        elif op == "T":
            s.reject("text")
        elif op == "S":
            s.next_frame()
        elif op == "R":
            if (seq := s.in_flight) is not None:
                s.finished(seq, {"label": f"L{seq}"})
        for a in drain(s):
            kind = "ok" if "label" in a else "drop" if a.get("dropped") else "err"
            sent.append(f"{a['seq']}:{kind}")
    return sent


@pytest.mark.parametrize(("drop", "script", "expected"), [
    # one frame at a time, answered as it finishes
    (LATEST, "FSR", ["0:ok"]),
    (NONE, "FSRFSR", ["0:ok", "1:ok"]),
    # a burst while frame 0 runs: latest keeps only the newest waiting frame
    (LATEST, "FSFFFRSR", ["0:ok", "1:drop", "2:drop", "3:ok"]),
    # none classifies every frame, in order
    (NONE, "FSFFFRSRSRSR", ["0:ok", "1:ok", "2:ok", "3:ok"]),
    # an early answer (text error, drop) waits behind the frame in flight
    (LATEST, "FSTFFR", ["0:ok", "1:err", "2:drop"]),
    (NONE, "FSTR", ["0:ok", "1:err"]),
    # with nothing in flight an error leaves at once
    (LATEST, "T", ["0:err"]),
    (NONE, "TFSR", ["0:err", "1:ok"]),
    # the frame in flight is never dropped, however many arrive behind it
    (LATEST, "FSFFFFFFR", ["0:ok", "1:drop", "2:drop", "3:drop", "4:drop", "5:drop"]),
])
def test_schedule_table(drop: DropPolicy, script: str, expected: list[str]) -> None:
    assert run(FrameScheduler(drop), script) == expected


@pytest.mark.parametrize("drop", [LATEST, NONE])
def test_every_seq_is_answered_exactly_once_in_order(drop: DropPolicy) -> None:
    s: FrameScheduler[str] = FrameScheduler(drop, max_waiting=1000, max_unsent=1000)
    script = "FSFFTFRSFFRSTFRSRSRSRSRSR" * 4 + "SRSRSRSRSRSR"
    sent = run(s, script)
    seqs = [int(x.split(":")[0]) for x in sent]
    assert seqs == list(range(s.received))
    assert s.idle() and s.in_flight is None and s.waiting == 0
    o = s.outcome()
    assert o.answered + o.dropped + o.errors == s.received
    if drop is NONE:
        assert o.dropped == 0


def test_one_frame_at_a_time() -> None:
    s: FrameScheduler[str] = FrameScheduler(NONE)
    s.frame("a")
    s.frame("b")
    assert s.next_frame() == (0, "a")
    assert s.next_frame() is None  # 0 still in flight
    s.finished(0, {"label": "x"})
    assert s.next_frame() == (1, "b")


def test_latest_holds_at_most_one_waiting_frame() -> None:
    s: FrameScheduler[bytes] = FrameScheduler(LATEST, max_waiting=2)
    for i in range(100):
        s.frame(bytes([i]))
        assert s.waiting == 1 and s.can_accept()
    assert s.next_frame() == (99, bytes([99]))


def test_none_stops_accepting_at_max_waiting() -> None:
    s: FrameScheduler[str] = FrameScheduler(NONE, max_waiting=3)
    for _ in range(3):
        assert s.can_accept()
        s.frame("x")
    assert not s.can_accept()
    with pytest.raises(SchedulerError):
        s.frame("one too many")
    s.next_frame()
    assert s.can_accept()


def test_overloaded_when_answers_pile_up_unsent() -> None:
    s: FrameScheduler[str] = FrameScheduler(LATEST, max_unsent=4)
    for _ in range(4):
        s.reject("text")
    assert not s.overloaded()
    s.reject("text")
    assert s.overloaded()
    s.pop_answer()
    assert not s.overloaded()


def test_answers_held_behind_the_frame_in_flight_pause_reading_not_overload() -> None:
    s: FrameScheduler[str] = FrameScheduler(LATEST, max_unsent=3)
    s.frame("a")
    s.next_frame()
    for _ in range(2):
        s.reject("text")
        assert s.can_accept()
    s.reject("text")
    assert s.pop_answer() is None  # 0 is still in flight
    assert s.held == 3 and s.unsent == 3
    assert not s.can_accept()  # the shell stops reading until frame 0 is done
    assert not s.overloaded()  # waiting for the model is not the client's fault
    s.finished(0, {"label": "x"})
    assert s.releasable == 4 and s.held == 0 and s.can_accept()
    assert s.overloaded()  # 4 free to go and none taken
    s.pop_answer()
    assert not s.overloaded()


def test_failed_frame_is_answered_with_its_error() -> None:
    s: FrameScheduler[str] = FrameScheduler(NONE)
    s.frame("a")
    s.next_frame()
    s.failed(0, "not an image")
    assert s.pop_answer() == {"seq": 0, "error": "not an image"}
    assert s.outcome() == Outcome(answered=0, dropped=0, errors=1)


def test_finishing_a_frame_that_is_not_in_flight_is_a_bug() -> None:
    s: FrameScheduler[str] = FrameScheduler(NONE)
    s.frame("a")
    with pytest.raises(SchedulerError):
        s.finished(0, {})
    s.next_frame()
    with pytest.raises(SchedulerError):
        s.finished(1, {})


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        FrameScheduler(LATEST, max_waiting=0)
    with pytest.raises(ValueError):
        FrameScheduler(LATEST, max_unsent=0)
