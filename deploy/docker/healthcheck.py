#!/usr/bin/env python3
"""Container health probe for the edge and worker images: one GET on loopback,
exit 0 when healthy, else exit 1 with one line saying what failed."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request

WILDCARDS = {"", "0.0.0.0", "::", "[::]", "*"}


def edge_url(env: dict[str, str]) -> str:
    """Liveness URL of an edge configured by EDGE_LISTEN / EDGE_INSECURE_HTTP."""
    host, _, port = env.get("EDGE_LISTEN", "0.0.0.0:8443").rpartition(":")
    host = host.strip("[]")
    if host in WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    # The same truthy spellings the edge itself accepts for --insecure-http.
    scheme = "http" if env.get("EDGE_INSECURE_HTTP", "") in ("1", "true") else "https"
    return f"{scheme}://{host}:{port or 8443}/_edge/health"


def worker_url(env: dict[str, str]) -> str:
    """Readiness URL of the inference server configured by INFER_HOST / INFER_PORT."""
    host = env.get("INFER_HOST", "127.0.0.1")
    if host in WILDCARDS:
        host = "127.0.0.1"
    return f"http://{host}:{env.get('INFER_PORT', '8000')}/healthz"


def probe(url: str, timeout: float) -> str | None:
    """None when `url` answers 2xx, else the reason."""
    # The edge certificate names the public host, not 127.0.0.1, and this probe
    # never leaves the container: it checks liveness, not identity.
    ctx = ssl._create_unverified_context() if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:
            return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{reason}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("target", help="`edge`, `worker`, or a full URL")
    ap.add_argument("--timeout", type=float, default=float(os.environ.get("HEALTHCHECK_TIMEOUT", "2")),
                    help="seconds to wait for the answer (HEALTHCHECK_TIMEOUT)")
    a = ap.parse_args(argv)
    env = dict(os.environ)
    url = {"edge": edge_url, "worker": worker_url}.get(a.target, lambda _env: a.target)(env)
    problem = probe(url, a.timeout)
    if problem is not None:
        print(f"unhealthy: {url}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
