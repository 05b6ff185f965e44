"""A userspace TCP relay that delays every chunk by a fixed plus a random
amount, in both directions, preserving order: a stand-in for a WAN link
where `tc netem` is not available.

usage: python delay_relay.py LISTEN_HOST:PORT TARGET_HOST:PORT --delay-ms 20 --jitter-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

# asyncio's timers fire up to ~1 ms late (epoll granularity); wake this much
# early and spin the rest of the way.
EARLY = 0.001


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, jitter: float,
               rng: random.Random) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                writer.close()
                return
            wait = due - time.monotonic()
            if wait > EARLY:
                await asyncio.sleep(wait - EARLY)
            while time.monotonic() < due:  # noqa: ASYNC110 - spin the last ms for an exact delay
                await asyncio.sleep(0)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(deliver())
    last_due = 0.0
    try:
        while True:
            data = await reader.read(65536)
            # Never deliver before the previous chunk: a link does not reorder.
            last_due = max(last_due, time.monotonic() + max(0.0, delay + rng.uniform(-jitter, jitter)))
            await queue.put((last_due, data))
            if not data:
                break
        await sender
    except (ConnectionError, asyncio.CancelledError):
        sender.cancel()
        writer.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("listen")
    ap.add_argument("target")
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--jitter-ms", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    lhost, lport = a.listen.rsplit(":", 1)
    thost, tport = a.target.rsplit(":", 1)
    rng = random.Random(a.seed)
    delay, jitter = a.delay_ms / 1000, a.jitter_ms / 1000

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(thost, int(tport))
        except OSError:
            cw.close()
            return
        await asyncio.gather(pump(cr, uw, delay, jitter, rng), pump(ur, cw, delay, jitter, rng))

    server = await asyncio.start_server(handle, lhost, int(lport))
    print(f"delay relay {a.listen} -> {a.target}: {a.delay_ms} +/- {a.jitter_ms} ms per chunk", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
