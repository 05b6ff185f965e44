"""The edge's end of a tunnel: tasks that belong to a session end with it."""

from __future__ import annotations

import asyncio
import gc
import weakref
from types import SimpleNamespace

from edge_proxy.app import make_app
from edge_proxy.auth import CredentialStore
from edge_proxy.config import EdgeConfig
from edge_proxy.health import HealthPolicy
from edge_proxy.session import EdgeSession
from edge_proxy.state import STATE


def open_session() -> EdgeSession:
    """A session on a real TunnelIO and Connection; only the WebSocket and the
    request are stand-ins (nothing here reads from them)."""
    cfg = EdgeConfig(health=HealthPolicy(check_interval=0.01, check_timeout=0.1))
    state = make_app(cfg, CredentialStore(), CredentialStore())[STATE]

    async def send(data: bytes) -> None:
        pass

    return EdgeSession(state, SimpleNamespace(remote="127.0.0.1"), SimpleNamespace(send_bytes=send), "t")  # type: ignore[arg-type]


async def test_health_check_loop_ends_with_its_tunnel_even_if_its_cancellation_is_lost():
    # On Python 3.11 asyncio.wait_for can swallow a cancel that arrives as its
    # inner future completes; the churn tool once found such a loop still
    # running, holding its whole session, after the tunnel had closed. Here
    # the loop is never cancelled at all: closing the tunnel must be enough.
    session = open_session()
    checks = asyncio.create_task(session._health_checks())
    await asyncio.sleep(0.05)
    assert not checks.done(), "the loop runs while its tunnel is open"
    await session.io.close("agent gone")
    await asyncio.wait_for(checks, 2.0)  # a few check intervals, with margin
    assert checks.exception() is None


async def test_a_closed_session_is_freed_by_reference_counting_not_by_the_cycle_collector():
    # Churn showed the edge's memory following full garbage collections: closed
    # tunnels waited in reference cycles. With the collector off, a closed
    # session that forgets its TunnelIO's callbacks must go as soon as the
    # last reference does.
    gc.disable()
    try:
        refs = []
        for forget in (False, True):
            session = open_session()
            session.io.start()
            await asyncio.sleep(0.02)
            await session.io.close("agent gone")
            if forget:
                session.io.forget_owner()
            refs.append(weakref.ref(session))
            del session
        assert refs[0]() is not None, "without forget_owner the session is held by a cycle (the test can fail)"
        assert refs[1]() is None, "a closed session that forgot its owner must be freed at once"
    finally:
        gc.enable()
        gc.collect()


def test_ws_message_is_one_server_frame_of_the_joined_frames_with_large_pieces_unjoined():
    from websockets.frames import Frame, Opcode
    from websockets.streams import StreamReader

    from edge_proxy.session import JOIN_BELOW, ws_message

    for sizes in ([0], [125], [126], [10, 65525], [65535, 1], [10, 70_000, 10, 3], [JOIN_BELOW, 5]):
        frames = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
        frames[0] = memoryview(frames[0])  # views pass through as they are
        out = ws_message(frames)
        big = [f for f in frames if len(f) >= JOIN_BELOW]
        assert all(any(o is f for o in out) for f in big), "large pieces are not copied"
        reader = StreamReader()
        reader.feed_data(b"".join(out))
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            next(parser)
        except StopIteration as done:
            frame = done.value
        else:
            raise AssertionError("incomplete frame")
        assert frame.opcode is Opcode.BINARY and frame.fin
        assert bytes(frame.data) == b"".join(frames)
        assert not reader.buffer
