"""Micro-benchmark of the tunnel core's hot paths: encoding and decoding a
typical request head, and pushing 1 MiB of body through a pair of
connections. Prints a table; asserts nothing.

    python bench/tunnel_codec.py
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunnel import Connection, DataReceived, Hello, RequestHead, Role  # noqa: E402
from tunnel.frames import decode_request_head, encode_request_head  # noqa: E402

HEAD = RequestHead("POST", "/photo?model=efficientnet-lite0", (
    ("Host", "edge.example.org"), ("User-Agent", "loadtest/0.1"), ("Accept", "*/*"),
    ("Content-Type", "image/jpeg"), ("Content-Length", "48213"), ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "edge.example.org"),
    ("X-Request-ID", "5f0c1e7a9b2d4c6e8f0a1b2c3d4e5f60"),
))


def body_through_pair(size: int) -> None:
    edge, agent = Connection(Role.EDGE), Connection(Role.AGENT)
    agent.send_hello(Hello("w"))
    edge.receive_data(agent.data_to_send())
    edge.accept()
    agent.receive_data(edge.data_to_send())
    sid = edge.open_stream()
    edge.send_request(sid, HEAD)
    data = b"x" * size
    sent = 0
    while sent < size:
        n = min(edge.send_window(sid), size - sent)
        edge.send_data(sid, data[sent:sent + n], end_stream=sent + n == size)
        sent += n
        for ev in agent.receive_data(edge.data_to_send()):
            if isinstance(ev, DataReceived):
                agent.acknowledge_received(sid, len(ev.data))
        edge.receive_data(agent.data_to_send())


def main() -> None:
    block = encode_request_head(HEAD)
    rows = []
    for name, fn, n in (
        ("encode request head", lambda: encode_request_head(HEAD), 20000),
        ("decode request head", lambda: decode_request_head(block, 256), 20000),
        ("1 MiB body through a connection pair", lambda: body_through_pair(1 << 20), 50),
    ):
        best = min(timeit.repeat(fn, number=n, repeat=5)) / n
        rows.append((name, best * 1e6))
    print(f"{'operation':<40} {'us per op':>10}")
    for name, us in rows:
        print(f"{name:<40} {us:10.2f}")


if __name__ == "__main__":
    main()
