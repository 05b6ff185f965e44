"""Helpers to run the real system on loopback in tests: free ports, child
processes with logs, waiting on conditions with deadlines, a local PKI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from edge_proxy import auth, certs

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str | Callable[[], str],
                   interval: float = 0.05) -> float:
    """Poll `predicate` until true; returns the seconds it took. Fails the test
    with `what` if the deadline passes."""
    start = time.monotonic()
    deadline = start + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if await predicate():
                return time.monotonic() - start
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            last_exc = exc
        await asyncio.sleep(interval)
    text = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout} s waiting for {text} (last error: {last_exc!r})")


class Proc:
    """A child process whose output goes to a log file shown on failure."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.p = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env,
                                  start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.p.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            try:
                os.kill(self.p.pid, signal.SIGCONT)
                self.p.terminate()
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
            except ProcessLookupError:
                pass
        self._log.close()
        return self.p.returncode

    def kill(self) -> None:
        if self.alive():
            self.p.kill()
            self.p.wait(5)


@dataclass
class Pki:
    dir: Path
    ca: Path
    cert: Path
    key: Path
    client_keys: Path
    worker_tokens: Path
    client_key: str  # an admin client key
    plain_key: str  # a non-admin client key
    limited_key: str  # 5 requests/s, burst 5
    worker_token: str
    other_worker_token: str

    def client_ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


def make_pki(d: Path) -> Pki:
    files = certs.make_all(d, ["localhost", "127.0.0.1"])
    keys, tokens = d / "client-keys.json", d / "worker-tokens.json"
    return Pki(
        d, files["ca"], files["cert"], files["key"], keys, tokens,
        client_key=auth.create(keys, "tester", auth.CLIENT_KEY_PREFIX, admin=True),
        plain_key=auth.create(keys, "plain", auth.CLIENT_KEY_PREFIX, admin=False),
        limited_key=auth.create(keys, "limited", auth.CLIENT_KEY_PREFIX, rate=5, burst=5),
        worker_token=auth.create(tokens, "workers", auth.WORKER_TOKEN_PREFIX),
        other_worker_token=auth.create(tokens, "other-team", auth.WORKER_TOKEN_PREFIX),
    )


class System:
    """Starts edges, agents and upstreams as real processes; stops them all."""

    def __init__(self, pki: Pki, log_dir: Path) -> None:
        self.pki = pki
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self.session: aiohttp.ClientSession | None = None

    def http(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.pki.client_ssl(), limit=0))
        return self.session

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.pki.client_key}"}

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        for p in reversed(self.procs):
            p.stop()

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        p = Proc(name, args, self.log_dir, env)
        self.procs.append(p)
        return p

    async def upstream(self, name: str = "upstream", port: int | None = None,
                       health_path: str = "/healthz") -> tuple[Proc, str]:
        """`health_path`: where the upstream answers health (404 everywhere else)."""
        port = port or free_port()
        p = self._start(name, [PY, str(ROOT / "tests" / "relay" / "upstream.py"), str(port)],
                        {"UPSTREAM_HEALTH_PATH": health_path})
        url = f"http://127.0.0.1:{port}"

        async def up() -> bool:
            async with self.http().get(url + health_path) as r:
                return r.status in (200, 503)

        await wait_for(up, 15, lambda: f"{name} to listen\n{p.log()}")
        return p, url

    async def inference(self, name: str = "inference", *extra: str, cache_dir: Path | None = None,
                        timeout: float = 240) -> tuple[Proc, str]:
        """The real inference server (its default backend and model unless
        `extra` says otherwise), waited for until /healthz is 200 (loaded and
        warm). `cache_dir`: where it keeps converted models (default: its own)."""
        port = free_port()
        cache = ["--cache-dir", str(cache_dir)] if cache_dir is not None else []
        p = self._start(name, [PY, "-m", "inference", "serve", "--host", "127.0.0.1", "--port", str(port), *cache,
                               *extra])
        url = f"http://127.0.0.1:{port}"

        async def ready() -> bool:
            if not p.alive():
                raise AssertionError(f"{name} exited:\n{p.log()}")
            async with self.http().get(url + "/healthz") as r:
                return r.status == 200

        await wait_for(ready, timeout, lambda: f"{name} to load its model\n{p.log()}", interval=0.2)
        return p, url

    async def edge(self, name: str = "edge", port: int | None = None, *extra: str) -> tuple[Proc, str]:
        port = port or free_port()
        pk = self.pki
        p = self._start(name, [PY, "-m", "edge_proxy", "serve", "--listen", f"127.0.0.1:{port}", "--cert", str(pk.cert),
                               "--key", str(pk.key), "--client-keys", str(pk.client_keys), "--worker-tokens",
                               str(pk.worker_tokens), "--check-interval", "0.5", "--grace", "3", *extra])
        url = f"https://127.0.0.1:{port}"

        async def up() -> bool:
            if not p.alive():
                raise AssertionError(f"{name} exited:\n{p.log()}")
            async with self.http().get(url + "/_edge/health") as r:
                return r.status == 200

        await wait_for(up, 15, lambda: f"{name} to listen\n{p.log()}")
        return p, url

    def agent(self, name: str, edge_url: str, upstream: str, *extra: str, pool: str = "default", capacity: int = 8,
              token: str | None = None, default_id: bool = False) -> Proc:
        """An agent with `--id name`, or with the agent's default id if `default_id`."""
        ws = edge_url.replace("https://", "wss://") + "/_edge/tunnel"
        ident = [] if default_id else ["--id", name]
        return self._start(name, [PY, "-m", "worker_agent", "--edge", ws, "--token", token or self.pki.worker_token,
                                  "--ca", str(self.pki.ca), "--upstream", upstream, "--pool", pool, "--capacity",
                                  str(capacity), *ident, "--health-interval", "0.5", *extra])

    async def workers(self, edge_url: str) -> dict[str, dict[str, object]]:
        async with self.http().get(edge_url + "/_edge/workers", headers=self.auth()) as r:
            data = json.loads(await r.text())
        return {w["id"]: w for w in data["workers"]}

    async def wait_available(self, edge_url: str, names: list[str], timeout: float = 20) -> float:
        async def ok() -> bool:
            ws = await self.workers(edge_url)
            return all(n in ws and ws[n]["available"] for n in names)

        return await wait_for(ok, timeout, lambda: f"workers {names} available at {edge_url}\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(p.name + ":\n" + p.log() for p in self.procs)
