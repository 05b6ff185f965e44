from __future__ import annotations

import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_proxy import certs
from tests.harness import PY, ROOT, Proc, free_port

SERVER = Path(__file__).resolve().parent / "server.py"


def wait_http(url: str, proc: Proc, timeout: float = 15.0, context: ssl.SSLContext | None = None) -> None:
    """Until `url` answers 200, or fail with the server's log."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if not proc.alive():
            raise AssertionError(f"test server exited:\n{proc.log()}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                if r.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"test server at {url} did not answer within {timeout} s ({last!r})\n{proc.log()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The deterministic test server on loopback, plain HTTP."""
    port = free_port()
    p = Proc("loadtest-server", [PY, str(SERVER), str(port)], tmp_path_factory.mktemp("server-logs"))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", p)
        yield url
    finally:
        p.stop()


@dataclass
class TlsServer:
    url: str
    ca: Path


@pytest.fixture(scope="session")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """The same server over HTTPS, with a certificate from a local CA."""
    d = tmp_path_factory.mktemp("tls")
    files = certs.make_all(d, ["localhost", "127.0.0.1"])
    port = free_port()
    p = Proc("loadtest-tls-server", [PY, str(SERVER), str(port), "--tls", str(files["cert"]), str(files["key"])], d)
    try:
        url = f"https://127.0.0.1:{port}"
        wait_http(url + "/healthz", p, context=ssl.create_default_context(cafile=str(files["ca"])))
        yield TlsServer(url, files["ca"])
    finally:
        p.stop()


def loadtest(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    """The real command line, as a user runs it."""
    r = subprocess.run([PY, "-m", "loadtest", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    return r


WS_SERVER = Path(__file__).resolve().parent / "wsserver.py"


@pytest.fixture(scope="session")
def ws_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The WebSocket test server (wsserver.py) on loopback, plain: its ws:// base URL."""
    port = free_port()
    p = Proc("loadtest-ws-server", [PY, str(WS_SERVER), str(port)], tmp_path_factory.mktemp("ws-logs"))
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", p)
        yield f"ws://127.0.0.1:{port}"
    finally:
        p.stop()


@pytest.fixture(scope="session")
def wss_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """The same WebSocket server over TLS: its wss:// base URL and CA."""
    d = tmp_path_factory.mktemp("wss")
    files = certs.make_all(d, ["localhost", "127.0.0.1"])
    port = free_port()
    p = Proc("loadtest-wss-server", [PY, str(WS_SERVER), str(port), "--tls", str(files["cert"]), str(files["key"])],
             d)
    try:
        wait_http(f"https://127.0.0.1:{port}/healthz", p, context=ssl.create_default_context(cafile=str(files["ca"])))
        yield TlsServer(f"wss://127.0.0.1:{port}", files["ca"])
    finally:
        p.stop()
