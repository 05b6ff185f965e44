"""Short runs of the reliability tools in bench/: the same promises, seconds
instead of minutes."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import ROOT


def run_tool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_short_soak_loses_nothing_and_stays_flat():
    r = run_tool("bench/soak.py", "--minutes", "0.25", "--warmup", "3", "--workers", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "BROKEN" not in r.stdout
    lost = next(line for line in r.stdout.splitlines() if line.startswith("lost"))
    assert lost.split()[1] == "0"


def test_short_churn_returns_the_edge_to_baseline():
    r = run_tool("bench/churn.py", "--cycles", "30", "--parallel", "10", "--warmup-cycles", "10")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "BROKEN" not in r.stdout and "30 cycles" in r.stdout
