"""Which processes of one edge the agent holds tunnels to. An edge run with
`--processes N` is N processes on one port; the kernel picks the process of
each new connection, and WELCOME says which one it was (`process` of
`processes`). The agent dials the same URL until it holds `per_process`
tunnels to every index; a tunnel that lands on an index already held fully is
a duplicate, ended at once and dialled again. Pure: time and the random
source are passed in (tests/agent/test_coverage.py drives it with a fake clock)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class EdgeCoverage:
    per_process: int = 1  # --tunnels-per-edge
    processes: int = 1  # from the latest WELCOME (an edge that says nothing is one process)
    # Duplicates of one slot in a row dialled again at once: N x H(N) dials
    # cover N processes on average, so `quick_factor` x N leaves room for bad luck.
    quick_factor: int = 4
    base: float = 0.25  # then waits grow from here (with full jitter) ...
    cap: float = 10.0  # ... up to this: a process that is being restarted is not there to be found
    rng: random.Random = field(default_factory=random.Random)
    held: dict[int, set[int]] = field(default_factory=dict)  # process index -> slots holding a tunnel to it
    duplicates: dict[int, int] = field(default_factory=dict)  # slot -> duplicates in a row
    reported: tuple[int, int] = (0, 1)  # (complete, processes) as last logged
    incomplete_since: float | None = None

    @property
    def wanted(self) -> int:
        """Tunnels (slots) the agent keeps to this edge."""
        return self.per_process * self.processes

    def claim(self, slot: int, process: int, processes: int) -> bool:
        """A tunnel of `slot` was accepted by `process` of `processes`: keep it
        (True) or end it as a duplicate (False)."""
        self.processes = processes
        self.release(slot)
        holders = self.held.setdefault(process, set())
        if len(holders) >= self.per_process:
            self.duplicates[slot] = self.duplicates.get(slot, 0) + 1
            return False
        holders.add(slot)
        self.duplicates.pop(slot, None)
        return True

    def release(self, slot: int) -> None:
        """The tunnel of `slot` ended (or never was)."""
        for holders in self.held.values():
            holders.discard(slot)

    def missing(self) -> list[int]:
        """Process indexes held by fewer than `per_process` tunnels."""
        return [p for p in range(self.processes) if len(self.held.get(p, ())) < self.per_process]

    def complete(self) -> int:
        return self.processes - len(self.missing())

    def duplicate_delay(self, slot: int) -> float | None:
        """Seconds before `slot` dials again after a duplicate; None: stop the
        slot (the edge now has fewer processes and every one is held)."""
        if slot >= self.wanted and not self.missing():
            return None
        n = self.duplicates.get(slot, 0)
        quick = self.quick_factor * self.processes
        if n <= quick:
            return 0.0
        return self.rng.uniform(0, min(self.cap, self.base * 2 ** min(n - quick - 1, 16)))

    def report(self, now: float) -> str | None:
        """A line for the log when the number of fully held processes changed
        since the last report, else None."""
        state = (self.complete(), self.processes)
        if state == self.reported:
            return None
        before, self.reported = self.reported, state
        text = f"processes {state[0]}/{state[1]}"
        if state[0] < state[1]:
            if self.incomplete_since is None or before[0] >= before[1]:
                self.incomplete_since = now
            return text + f" (missing {', '.join(map(str, self.missing()))})"
        since, self.incomplete_since = self.incomplete_since, None
        return text + (f" (complete after {now - since:.1f} s)" if since is not None else "")
