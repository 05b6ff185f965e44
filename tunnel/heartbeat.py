"""Heartbeat policy: when to ping, when a silent tunnel is dead, and the
smoothed round-trip time. Pure: every method takes `now` (seconds)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Heartbeat:
    """Ping every `interval` seconds; declare the peer dead when nothing at all
    has been received for `timeout` seconds (any frame counts as a sign of
    life, so a busy tunnel never needs its pongs to be on time).

    Defaults: interval 1 s, timeout 3 s -> a dead tunnel is noticed within 3 s.
    """

    interval: float = 1.0
    timeout: float = 3.0
    last_received: float = 0.0
    last_ping_sent: float = float("-inf")
    rtt: float | None = None  # last sample, seconds
    srtt: float | None = None  # smoothed (gain 1/8, as TCP)
    samples: int = field(default=0)

    def start(self, now: float) -> None:
        self.last_received = now

    def on_receive(self, now: float) -> None:
        self.last_received = now

    def ping_due(self, now: float) -> bool:
        return now - self.last_ping_sent >= self.interval

    def on_ping_sent(self, now: float) -> None:
        self.last_ping_sent = now

    def on_pong(self, now: float, sent_at: float) -> None:
        rtt = max(0.0, now - sent_at)
        self.rtt = rtt
        self.srtt = rtt if self.srtt is None else self.srtt + (rtt - self.srtt) / 8
        self.samples += 1

    def is_dead(self, now: float) -> bool:
        return now - self.last_received >= self.timeout

    def next_wakeup(self, now: float) -> float:
        """Seconds until something is due (a ping or the dead-line)."""
        until_ping = self.last_ping_sent + self.interval - now
        until_dead = self.last_received + self.timeout - now
        return max(0.0, min(until_ping, until_dead))
