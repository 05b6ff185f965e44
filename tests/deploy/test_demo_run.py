"""`make demo` itself, run end to end with short durations as CI runs it:
edge, two workers with their inference servers, the load tests, the stream,
and what it prints is true and copyable (the key never printed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.slow


def test_the_demo_runs_end_to_end_and_prints_copyable_commands(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "deploy.demo", "--state", str(state), "--duration", "2",
                          "--stream-duration", "2", "--backends", "opencv-dnn,onnxruntime"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    key = (state / "secrets" / "client-key").read_text().strip()
    assert key and key not in text, "the client key must never be printed"
    assert (state / "secrets" / "client-key").stat().st_mode & 0o077 == 0
    assert re.search(r'EDGE_KEY="\$\(cat .*client-key\)"', text), text[-3000:]
    commands = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("$ ") and "loadtest" in line]
    assert len(commands) >= 5, text[-3000:]
    for line in commands:
        assert line.split()[0].endswith("python") and " -m loadtest " in line, line
        if "--api-key" in line:
            assert '--api-key "$EDGE_KEY"' in line, line
    assert any(" stream " in c and "wss://" in c for c in commands), "the demo ends with a live stream run"
    assert re.search(r"inspector: https://127\.0\.0\.1:\d+/_edge/", text), text[-3000:]
    reports = list((state / "reports").glob("*.html"))
    assert len(reports) >= 5 and all(r.stat().st_size > 1000 for r in reports), reports
