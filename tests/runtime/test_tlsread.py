"""Record-sized TLS reads (runtime/tlsread.py): a real TLS session between
two SSLObjects over memory BIOs, the way asyncio and uvloop drive them."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from runtime.tlsread import READ_CAP, RecordSizedReads, record_sized_reads
from tests.harness import make_pki


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    if data := src.read():
        dst.write(data)


def test_reads_ask_for_one_record_at_most_and_lose_nothing(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    sctx = record_sized_reads(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    sctx.load_cert_chain(pki.cert, pki.key)
    cctx = record_sized_reads(pki.client_ssl())
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    client = cctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    assert isinstance(server, RecordSizedReads) and isinstance(client, RecordSizedReads)
    for _ in range(10):  # the handshake
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        _pump(c_out, s_in)
        _pump(s_out, c_in)
    payload = os.urandom(300_000)
    client.write(payload)
    _pump(c_out, s_in)
    got, sizes = [], []
    while True:
        try:
            chunk = server.read(256 * 1024)  # what the event loops ask for
        except ssl.SSLWantReadError:
            break
        got.append(chunk)
        sizes.append(len(chunk))
    assert b"".join(got) == payload
    assert max(sizes) <= READ_CAP
    # A read into a caller's buffer (the event loops' buffered path) is left as asked.
    client.write(b"x" * 100)
    _pump(c_out, s_in)
    buf = bytearray(1000)
    assert server.read(1000, buf) == 100 and buf[:100] == b"x" * 100
