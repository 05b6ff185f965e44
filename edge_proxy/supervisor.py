"""`edge-proxy serve --processes N` with N > 1: this process starts N edge
processes on the same port and looks after them (docs/architecture.md,
"Several edge processes").

Each child is the same command run again (`python -m edge_proxy <the same
arguments> --edge-child I,N,DIR`), not a `multiprocessing` child: it parses
the same flags and environment, so nothing of the configuration has to be
pickled or kept in step, its log lines and start-up errors are those of one
edge, and it imports prometheus_client only after `PROMETHEUS_MULTIPROC_DIR`
is in its environment (which multiprocess mode needs).

The supervisor checks what it can in one line before starting anyone
(credentials, certificate, the port), restarts a child that dies (with a
backoff; one log line), forwards SIGTERM/SIGINT (each child drains as one edge
does) and SIGHUP, and exits 0 once every child has stopped cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.cli import StartupError

from .config import EdgeConfig

log = logging.getLogger("edge_proxy.supervisor")

CHILD_FLAG = "--edge-child"
STARTUP_TIMEOUT = 60.0  # seconds for every child to listen at start (imports on a busy machine are slow)
STABLE_AFTER = 60.0  # a child that ran this long restarts without waiting
RESTART_BASE, RESTART_CAP = 0.5, 30.0


def socket_path(runtime_dir: str, index: int) -> Path:
    """Where process `index` answers its siblings (edge_proxy/siblings.py)."""
    return Path(runtime_dir) / f"edge-{index}.sock"


def metrics_dir(runtime_dir: str) -> Path:
    return Path(runtime_dir) / "metrics"


def parse_child(value: str) -> tuple[int, int, str]:
    """`I,N,DIR` of the hidden --edge-child flag."""
    index, n, directory = value.split(",", 2)
    return int(index), int(n), directory


def restart_delay(failures: int) -> float:
    """Seconds before restarting a child that died `failures` times in a row (1 = first)."""
    return float(min(RESTART_CAP, RESTART_BASE * 2.0 ** max(0, failures - 1)))


@dataclass(eq=False)
class Child:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    failures: int = 0  # deaths in a row, each after less than STABLE_AFTER s
    ready: bool = False
    waiter: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, cfg: EdgeConfig, argv: list[str]) -> None:
        self.cfg = cfg
        self.argv = argv
        self.n = cfg.processes
        # Under systemd with RuntimeDirectory= there, else the temporary directory (PrivateTmp in the unit).
        self.runtime_dir = tempfile.mkdtemp(prefix="edge-proxy-", dir=os.environ.get("RUNTIME_DIRECTORY") or None)
        self.metrics = metrics_dir(self.runtime_dir)
        self.metrics.mkdir()
        self.children = [Child(i) for i in range(self.n)]
        self.stopping = asyncio.Event()
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics)}

    async def _spawn(self, c: Child) -> None:
        with contextlib.suppress(FileNotFoundError):
            socket_path(self.runtime_dir, c.index).unlink()
        c.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge_proxy", *self.argv, CHILD_FLAG, f"{c.index},{self.n},{self.runtime_dir}",
            env=self.env)
        c.started = time.monotonic()
        c.ready = False

    async def _wait_ready(self) -> None:
        """Every child listening (its sibling socket exists), or StartupError:
        a child that fails at start has printed its own one-line error."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not all(c.ready for c in self.children):
            for c in self.children:
                assert c.proc is not None
                if c.proc.returncode is not None:
                    raise StartupError(f"edge process {c.index} exited with code {c.proc.returncode} while starting "
                                       "(its error is above)")
                c.ready = c.ready or socket_path(self.runtime_dir, c.index).exists()
            if time.monotonic() > deadline:
                raise StartupError(f"edge processes did not start listening within {STARTUP_TIMEOUT:.0f} s")
            if self.stopping.is_set():
                return
            await asyncio.sleep(0.05)

    async def _watch(self, c: Child) -> None:
        """Restart `c` whenever it dies, until the supervisor stops."""
        while True:
            assert c.proc is not None
            code = await c.proc.wait()
            if self.stopping.is_set():
                return
            ran = time.monotonic() - c.started
            if code == -signal.SIGHUP:
                # Passed on by us to a process still starting (its reload
                # handler not yet installed): no failure. Start it again at once.
                delay = 0.0
                log.info("edge process %d (pid %d) ended on SIGHUP; starting it again", c.index, c.proc.pid)
            else:
                c.failures = 1 if ran > STABLE_AFTER else c.failures + 1
                delay = restart_delay(c.failures)
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
                log.warning("edge process %d (pid %d) exited with %s after %.0f s; restarting it in %.1f s", c.index,
                            c.proc.pid, how, ran, delay)
            self._forget(c.proc.pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return
            await self._spawn(c)

    def _forget(self, pid: int) -> None:
        """A dead child's live gauges leave the merged metrics; its counters stay."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.metrics))  # type: ignore[no-untyped-call]

    def _signal_all(self, sig: int) -> None:
        for c in self.children:
            if c.proc is not None and c.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(sig)

    def _stop(self, sig: int) -> None:
        if not self.stopping.is_set():
            log.info("supervisor: %s, stopping %d edge processes (each drains for up to %.0f s)",
                     signal.Signals(sig).name, self.n, self.cfg.grace)
        self.stopping.set()
        self._signal_all(sig)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        try:
            for c in self.children:
                await self._spawn(c)
            try:
                await self._wait_ready()
            except StartupError:
                self.stopping.set()
                self._signal_all(signal.SIGTERM)
                await self._reap(5.0)
                raise
            pids = ", ".join(str(c.proc.pid) for c in self.children if c.proc is not None)
            log.info("supervisor: %d edge processes share %s (pids %s); runtime dir %s", self.n, self.cfg.listen,
                     pids, self.runtime_dir)
            for c in self.children:
                c.waiter = asyncio.create_task(self._watch(c), name=f"edge-child-{c.index}")
            await self.stopping.wait()
            codes = await self._reap(self.cfg.grace + 15.0)
            for c in self.children:
                if c.waiter is not None:
                    c.waiter.cancel()
            # Killed by the signal itself: a child still starting (no handler yet), which served nothing.
            clean = (0, -signal.SIGTERM, -signal.SIGINT)
            bad = {i: code for i, code in codes.items() if code not in clean}
            if bad:
                log.warning("supervisor: edge processes ended with %s", bad)
                return 1
            log.info("supervisor: all %d edge processes stopped", self.n)
            return 0
        finally:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    async def _reap(self, timeout: float) -> dict[int, int | None]:
        """Wait for every child to exit (SIGKILL after `timeout`); their exit codes."""
        procs = [(c.index, c.proc) for c in self.children if c.proc is not None]
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(p.wait() for _, p in procs))
        except TimeoutError:
            log.warning("supervisor: edge processes still running %.0f s after the signal; killing them", timeout)
            for _, p in procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for _, p in procs))
        return {i: p.returncode for i, p in procs}


def check_port(cfg: EdgeConfig) -> None:
    """Fail in one line if the port is taken. The children bind with
    SO_REUSEPORT, which would quietly share the port with another process of
    the same user that did too: this plain bind refuses that."""
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((cfg.host, cfg.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"port {cfg.port} on {cfg.host} is already in use; stop the other process or "
                                   "choose another with --listen") from None
            raise StartupError(f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}") from None


def die_with_parent() -> None:
    """A child ends (SIGTERM: it drains) if the supervisor is killed outright (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the supervisor died before the call
        os.kill(os.getpid(), signal.SIGTERM)
