"""Which workers are connected, in which pool, how busy and how healthy, and
the admission of requests to them: a slot per unit of effective capacity
(the advertised one, lowered while a worker sheds load: overload.py), a
bounded FIFO wait with a deadline when every slot is taken. It talks to
tunnels through the small `TunnelSession` protocol and gives metrics a
plain-data `snapshot()`."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from . import balancer
from .balancer import Ewma
from .health import HealthPolicy, WorkerHealth, ejection_allowed
from .overload import AdaptiveLimit, LimitPolicy


class TunnelSession(Protocol):
    """What the registry (and the edge's drain) needs of one worker tunnel;
    `session.EdgeSession` is the real one, tests may pass their own."""

    @property
    def accepting(self) -> bool: ...

    @property
    def open_streams(self) -> int: ...

    @property
    def rtt(self) -> float | None: ...

    def abort(self, reason: str) -> None: ...

    def goaway(self, reason: str) -> None: ...


class NoWorkerAvailable(Exception):
    """No worker could take the request; `retry_after` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnknownPool(Exception):
    pass


@dataclass(eq=False)
class Worker:
    agent_id: str
    pool: str
    capacity: int
    health: WorkerHealth
    token_name: str = ""
    software: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    instance: str = ""  # the agent process's random identity ("" = an agent too old to send one)
    health_path: str = ""  # where the agent asked to be checked ("" = the edge's fallback)
    sessions: dict[str, TunnelSession] = field(default_factory=dict)  # tunnel index -> session
    kind: str = "tunnel"  # or "direct": the edge dials `url` itself (direct.py)
    url: str = ""  # a direct worker's http://HOST:PORT
    in_flight: int = 0
    served: int = 0
    errors: int = 0
    shed: int = 0  # answers that said "busy" (503 + Retry-After, 429): neither served nor errors
    limit: AdaptiveLimit = field(default_factory=AdaptiveLimit)  # concurrency learned from its shedding
    # `limit` at the last admission decision, for the balancer (refreshed by the registry).
    effective_capacity: int = 0
    latency: Ewma = field(default_factory=Ewma)
    connected_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.effective_capacity = self.capacity

    @property
    def ewma_latency(self) -> float:
        return self.latency.value

    def live_session(self) -> TunnelSession | None:
        best = None
        for s in self.sessions.values():
            if s.accepting and (best is None or s.open_streams < best.open_streams):
                best = s
        return best

    def available(self, now: float) -> bool:
        return self.live_session() is not None and self.health.is_available(now)

    def rtt(self) -> float | None:
        rtts = [s.rtt for s in self.sessions.values() if s.rtt is not None]
        return min(rtts) if rtts else None


@dataclass(eq=False)
class Lease:
    """A slot on a worker, held for one request; `release()` exactly once."""

    worker: Worker
    registry: Registry
    released: bool = False

    def release(self, ok: bool | None = None, latency: float | None = None, shed: bool = False) -> None:
        """`ok` feeds outlier detection (None: the answer says nothing about
        the worker's health); `shed`: the worker answered "busy"."""
        if self.released:
            return
        self.released = True
        self.registry.release(self, ok, latency, shed)


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    agent_id: str
    pool: str
    state: str
    rtt: float | None
    in_flight: int
    tunnels: int
    effective_capacity: int
    kind: str = "tunnel"


@dataclass(frozen=True, slots=True)
class RegistrySnapshot:
    """The registry's state as plain data, for metrics and the inspector."""

    workers: tuple[WorkerSnapshot, ...]
    waiting: dict[str, int]  # pool -> requests waiting for a slot


class Pool:
    def __init__(self, name: str) -> None:
        self.name = name
        self.workers: list[Worker] = []
        self.waiters: deque[asyncio.Future[Lease]] = deque()


class Registry:
    def __init__(
        self,
        policy: HealthPolicy | None = None,
        max_queue: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_ejection: Callable[[Worker], None] | None = None,
        limit_policy: LimitPolicy | None = None,
        on_ejection_capped: Callable[[Worker, bool], None] | None = None,
        on_limited: Callable[[Worker], None] | None = None,
    ) -> None:
        """`on_ejection_capped(worker, first)`: the cap kept a failing worker
        in (`first` for the first time since it last succeeded or was ejected);
        `on_limited(worker)`: shedding lowered a worker that was at its full
        capacity."""
        self.policy = policy or HealthPolicy()
        self.limit_policy = limit_policy or LimitPolicy()
        self.max_queue = max_queue
        self.clock = clock
        self.rng = rng or random.Random()
        self.pools: dict[str, Pool] = {}
        self.workers: dict[str, Worker] = {}
        self.on_ejection = on_ejection
        self.on_ejection_capped = on_ejection_capped
        self.on_limited = on_limited

    # ----------------------------------------------------------- membership
    def clash(self, agent_id: str, instance: str, token_name: str) -> str | None:
        """Why a tunnel announcing `agent_id` must be refused, or None to admit it.

        The same process reconnecting (same instance) is admitted and replaces
        its stale tunnel. Another process (another instance) is refused while
        the first still has a live tunnel: otherwise the two would replace each
        other's tunnels for ever. Agents that send no instance keep the old
        rule (a newcomer replaces the tunnel)."""
        w = self.workers.get(agent_id)
        if w is None:
            return None
        if w.token_name != token_name:
            return "agent id is in use by another credential"
        if w.instance and instance and w.instance != instance and w.live_session() is not None:
            return "another worker process already uses it"
        return None

    def attach(self, session: TunnelSession, agent_id: str, pool: str, capacity: int, tunnel: str, token_name: str,
               software: str = "", labels: dict[str, str] | None = None, instance: str = "",
               health_path: str = "") -> tuple[Worker, TunnelSession | None]:
        """Add a session; returns the worker and the stale session it replaced (to close)."""
        w = self.workers.get(agent_id)
        if w is not None and (w.pool != pool or (w.instance and instance and w.instance != instance)):
            # Moving pools, or a new process taking over from one that is
            # draining: a worker of its own; the old sessions finish alone.
            self._remove_worker(w)
            w = None
        if w is None:
            w = Worker(agent_id, pool, capacity, WorkerHealth(self.policy), token_name, software, dict(labels or {}),
                       instance, limit=AdaptiveLimit(self.limit_policy))
            self.workers[agent_id] = w
            self.pools.setdefault(pool, Pool(pool)).workers.append(w)
        w.capacity = capacity
        w.software = software
        w.labels = dict(labels or {})
        w.instance = instance
        w.health_path = health_path
        stale = w.sessions.get(tunnel)
        w.sessions[tunnel] = session
        self.wake(pool)
        return w, stale

    def detach(self, worker: Worker, tunnel: str, session: TunnelSession) -> None:
        if worker.sessions.get(tunnel) is session:
            del worker.sessions[tunnel]
        if not worker.sessions and self.workers.get(worker.agent_id) is worker:
            self._remove_worker(worker)

    def _remove_worker(self, w: Worker) -> None:
        self.workers.pop(w.agent_id, None)
        pool = self.pools.get(w.pool)
        if pool is not None and w in pool.workers:
            pool.workers.remove(w)
        # Waiters stay queued: another worker (or this one, reconnecting) may
        # free a slot before their deadline.

    def snapshot(self) -> RegistrySnapshot:
        now = self.clock()
        workers = tuple(
            WorkerSnapshot(w.agent_id, w.pool, w.health.state(now) if w.live_session() else "disconnected", w.rtt(),
                           w.in_flight, len(w.sessions), w.limit.effective(now, w.capacity), w.kind)
            for p in self.pools.values() for w in p.workers)
        return RegistrySnapshot(workers, {name: len(p.waiters) for name, p in self.pools.items()})

    def pool_names(self) -> list[str]:
        return sorted(name for name, p in self.pools.items() if p.workers or name == "default")

    # ------------------------------------------------------------ admission
    def try_acquire(self, pool_name: str, exclude: Worker | None = None) -> Lease | None:
        """A slot now, or None; never on `exclude` (the worker that just refused)."""
        pool = self.pools.get(pool_name)
        if pool is None:
            return None
        now = self.clock()
        candidates = [w for w in pool.workers if w is not exclude and w.available(now)]
        for c in candidates:
            c.effective_capacity = c.limit.effective(now, c.capacity)
        w = balancer.choose(candidates, self.rng)
        if w is None:
            return None
        w.in_flight += 1
        return Lease(w, self)

    async def acquire(self, pool_name: str, timeout: float) -> Lease:
        """A slot on a worker of the pool, waiting in FIFO order up to `timeout`."""
        pool = self.pools.get(pool_name)
        if pool is None:
            raise UnknownPool(pool_name)
        now = self.clock()
        if not any(w.available(now) for w in pool.workers):
            raise NoWorkerAvailable(f"no healthy worker in pool {pool_name!r}", retry_after=1.0)
        if not pool.waiters:  # never overtake someone already waiting
            lease = self.try_acquire(pool_name)
            if lease is not None:
                return lease
        if len(pool.waiters) >= self.max_queue or timeout <= 0:
            raise NoWorkerAvailable(f"all workers of pool {pool_name!r} are at capacity", retry_after=max(1.0, timeout))
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        pool.waiters.append(fut)
        try:
            # Not wait_for: on 3.11 it can lose the cancellation of a client
            # that leaves just as its slot is granted (CPython gh-86296).
            async with asyncio.timeout(timeout):
                await asyncio.shield(fut)
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                fut.result().release()  # granted just as we gave up: hand it back
            else:
                fut.cancel()
            try:
                pool.waiters.remove(fut)
            except ValueError:
                pass
            if isinstance(exc, TimeoutError):
                raise NoWorkerAvailable(
                    f"all workers of pool {pool_name!r} stayed at capacity for {timeout:g} s",
                    retry_after=max(1.0, timeout),
                ) from None
            raise
        return fut.result()

    def release(self, lease: Lease, ok: bool | None, latency: float | None, shed: bool = False) -> None:
        w = lease.worker
        in_flight = w.in_flight
        w.in_flight -= 1
        now = self.clock()
        if latency is not None:
            w.latency.add(now, latency)
        if shed:
            # Busy, not broken: no ejection, and no reset of a failure streak
            # either (a worker failing between refusals is still failing).
            w.shed += 1
            was_full = not w.limit.limited(now, w.capacity)
            if w.limit.record_shed(now, w.capacity, in_flight) and was_full and self.on_limited is not None:
                self.on_limited(w)
        elif ok is not None:
            w.served += 1
            if not ok:
                w.errors += 1
            health = w.health
            was_capped, capped_before = health.capped, health.ejections_capped
            may_eject = ok or self.may_eject(w, now)
            if health.record_response(now, ok, may_eject):
                if self.on_ejection is not None:
                    self.on_ejection(w)
            elif health.ejections_capped != capped_before and self.on_ejection_capped is not None:
                self.on_ejection_capped(w, not was_capped)
        self.wake(w.pool)

    def may_eject(self, w: Worker, now: float) -> bool:
        """The pool's ejection cap (health.ejection_allowed) for `w` now."""
        pool = self.pools.get(w.pool)
        members = pool.workers if pool is not None else [w]
        ejected = sum(1 for m in members if m.health.is_ejected(now))
        others = sum(1 for m in members if m is not w and m.available(now))
        return ejection_allowed(len(members), ejected, others, self.policy.max_ejection_percent)

    def wake(self, pool_name: str) -> None:
        """Hand free slots to waiters, first come first served."""
        pool = self.pools.get(pool_name)
        if pool is None:
            return
        while pool.waiters:
            waiter = pool.waiters[0]
            if waiter.done():
                pool.waiters.popleft()
                continue
            lease = self.try_acquire(pool_name)
            if lease is None:
                return
            pool.waiters.popleft()
            waiter.set_result(lease)

