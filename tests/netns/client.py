"""Run inside a namespace: N requests to URL, print one JSON line per
response with its status and Server-Timing entries (milliseconds)."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time

import aiohttp


def timings(header: str) -> dict[str, float]:
    out = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out


async def main(url: str, key: str, ca: str, count: int, pool: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    if pool:
        headers["X-Pool"] = pool
    ctx = ssl.create_default_context(cafile=ca)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        for _ in range(count):
            start = time.monotonic()
            try:
                async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as r:
                    body = await r.read()
                    print(json.dumps({"status": r.status, "timing": timings(r.headers.get("Server-Timing", "")),
                                      "body": body[:2000].decode(errors="replace"),
                                      "elapsed_s": time.monotonic() - start}), flush=True)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                print(json.dumps({"status": 0, "error": repr(exc), "elapsed_s": time.monotonic() - start}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else ""))
