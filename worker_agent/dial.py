"""The tunnel's WebSocket to the edge: its TLS context, how it is made (our
own protocol on websockets' sans-I/O core, wsconn.py, or websockets' asyncio
client when asked or when a proxy must be crossed) and how it is read into
the tunnel. tunnel_client.py runs the session over it."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from relay.io import TunnelIO
from runtime.cli import StartupError
from runtime.tlsread import record_sized_reads
from tunnel import ErrorCode, PeerSettings, ProtocolError, State

from . import __version__, wsconn
from .config import AgentConfig

log = logging.getLogger("worker_agent")


def client_ssl_context(cfg: AgentConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    record_sized_reads(ctx)  # no 256 KiB buffer per TLS read (runtime/tlsread.py)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.ca:
        try:
            ctx.load_verify_locations(cfg.ca)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"cannot load CA file {cfg.ca}: {exc}; pass the edge's ca.pem with --ca") from None
    if cfg.client_cert:
        try:
            ctx.load_cert_chain(cfg.client_cert, cfg.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"cannot load client certificate {cfg.client_cert}: {exc}") from None
    if cfg.insecure:
        log.warning("TLS certificate verification of the edge is OFF (--insecure): anyone on the path can "
                    "impersonate the edge and read every request")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def connect(cfg: AgentConfig, settings: PeerSettings, url: str,
                  agent_ssl: ssl.SSLContext) -> ClientConnection | wsconn.WSConnection:
    """The WebSocket connection to the edge: our own protocol on websockets'
    sans-I/O core (wsconn), or websockets' asyncio client when asked
    (--tunnel-client websockets) or when a proxy must be crossed."""
    ssl_context = agent_ssl if url.startswith("wss:") else None
    headers = {"Authorization": f"Bearer {cfg.token}"}
    max_size = settings.connection_window + (1 << 20)
    user_agent = f"worker-agent/{__version__}"
    if cfg.tunnel_client == "own" and not wsconn.needs_proxy(url):
        return await wsconn.connect(url, ssl_context=ssl_context, headers=headers, user_agent=user_agent,
                                    max_size=max_size, open_timeout=10, close_timeout=1)
    return await ws_connect(
        url,
        ssl=ssl_context,
        additional_headers=headers,
        max_size=max_size,
        max_queue=64,
        ping_interval=None,  # the tunnel has its own heartbeats
        compression=None,
        open_timeout=10,
        close_timeout=1,
        # Honours https_proxy / no_proxy: many networks that block inbound
        # traffic also force outbound HTTPS through a proxy.
        proxy=True,
        user_agent_header=user_agent,
    )


async def read_own(ws: wsconn.WSConnection, io: TunnelIO, name: str, reconnect_due: Callable[[], bool]) -> None:
    """Reading with wsconn: the messages' bytes are fed to the tunnel from
    the transport's callback as they arrive (no task or queue per
    message); this waits for the end and says why, as `read_loop` does."""

    def on_data(data: bytes | memoryview) -> None:
        try:
            io.feed(data)
        except ProtocolError as exc:
            log.error("tunnel %s: the edge sent a malformed frame: %s", name, exc)
            ws.send_now(io.conn.data_to_send())  # the GOAWAY saying why, before the close
            raise
        if io.conn.state is State.CLOSED or reconnect_due():
            ws.stop_reading()  # all our streams are done: reconnect (to the restarted edge)

    ws.start(on_data)
    await ws.done
    if ws.closed_exc is not None and (conn_goaway := io.conn.goaway_received):
        if conn_goaway.code is not ErrorCode.NO_ERROR:
            raise ConnectionError(f"edge closed the tunnel: {conn_goaway.code.name} {conn_goaway.reason}")


async def read_loop(ws: ClientConnection, io: TunnelIO, name: str, reconnect_due: Callable[[], bool]) -> None:
    while True:
        try:
            data = await ws.recv()
        except ConnectionClosed:
            if conn_goaway := io.conn.goaway_received:
                if conn_goaway.code is not ErrorCode.NO_ERROR:
                    raise ConnectionError(f"edge closed the tunnel: {conn_goaway.code.name} "
                                          f"{conn_goaway.reason}") from None
            return
        if isinstance(data, str):
            raise ConnectionError("edge sent a text message")
        try:
            io.feed(data)
        except ProtocolError as exc:
            log.error("tunnel %s: the edge sent a malformed frame: %s", name, exc)
            await io.drain_output()
            raise
        if io.conn.state is State.CLOSED:
            return
        if reconnect_due():
            return  # all our streams are done: reconnect (to the restarted edge)
