#!/usr/bin/env python3
"""Print the pip requirements one image role needs, taken from pyproject.toml so
versions live in one place; the edge image skips the heavy model stack."""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

# The edge and the agent import only these; everything else (numpy, OpenCV, ONNX,
# weights) is for the inference server, and keeping it out of the edge image keeps
# the public-facing container small and its attack surface low.
EDGE_DISTRIBUTIONS = frozenset({"aiohttp", "websockets", "cryptography", "prometheus-client", "uvloop"})


def distribution_name(requirement: str) -> str:
    """`aiohttp>=3.9,<4` -> `aiohttp` (normalised as PEP 503 does)."""
    name = re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path, role: str) -> list[str]:
    deps: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    if role == "worker":
        return list(deps)
    chosen = [d for d in deps if distribution_name(d) in EDGE_DISTRIBUTIONS]
    missing = EDGE_DISTRIBUTIONS - {distribution_name(d) for d in chosen}
    if missing:
        raise SystemExit(f"error: {pyproject} no longer lists {', '.join(sorted(missing))}; "
                         "update EDGE_DISTRIBUTIONS in deploy/docker/requirements.py")
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("role", choices=["edge", "worker"], help="edge: the edge's few dependencies; worker: all of them")
    ap.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"), help="path to pyproject.toml")
    a = ap.parse_args(argv)
    try:
        lines = requirements(a.pyproject, a.role)
    except FileNotFoundError:
        print(f"error: {a.pyproject} not found; run from the repository root or pass --pyproject", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
