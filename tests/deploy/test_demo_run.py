"""`make demo` itself, run end to end with short durations as CI runs it:
edge, two workers with their inference servers, the load tests, the stream,
one detection and one transformation through the edge (when `make weights`
has fetched their files), and what it prints is true and copyable (the key
never printed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.demo import rel
from inference.weights import WeightsSettings, missing
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
    echoed = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("$ ")]
    commands = [line for line in echoed if " -m loadtest " in line]
    assert len(commands) >= 5, text[-3000:]
    for line in commands:
        assert line.split()[0].endswith("python") and " -m loadtest " in line, line
        if "--api-key" in line:
            assert '--api-key "$EDGE_KEY"' in line, line
    assert any(" stream " in c and "wss://" in c for c in commands), "the demo ends with a live stream run"
    assert re.search(r"inspector: https://127\.0\.0\.1:\d+/_edge/", text), text[-3000:]
    reports = list((state / "reports").glob("*.html"))
    assert len(reports) >= 5 and all(r.stat().st_size > 1000 for r in reports), reports
    check_vision(state, text, [line for line in echoed if line.startswith("curl ")])


def check_vision(state: Path, text: str, curls: list[str]) -> None:
    """With the model files: one image with boxes and one with its background
    replaced, both real images the size of the photos sent, the detections
    and the paths printed, the curl commands copyable. Without: one line why."""
    from PIL import Image

    gone = missing(WeightsSettings().path())
    boxed, replaced = state / "reports" / "detect-cat.jpg", state / "reports" / "transform-astronaut.jpg"
    if gone:
        assert re.search(r"detection and transformation skipped: .*missing; run `make weights`", text), text[-3000:]
        assert not boxed.exists() and not replaced.exists() and not curls
        return
    samples = ROOT / "loadtest" / "samples"
    for saved, sent in ((boxed, samples / "cat.jpg"), (replaced, samples / "astronaut.jpg")):
        assert saved.is_file(), text[-3000:]
        with Image.open(saved) as img:
            img.verify()
        with Image.open(saved) as img, Image.open(sent) as original:
            assert img.format == "JPEG" and img.size == original.size
        assert re.search(rf"^ +saved {re.escape(rel(saved))} ", text, re.M), text[-3000:]
    assert re.search(r"^ +detections: Cat 0\.\d\d at \[", text, re.M), text[-3000:]
    assert len(curls) == 2 and all('-H "Authorization: Bearer $EDGE_KEY"' in c for c in curls), curls
    assert "/detect" in curls[0] and "/transform?mode=replace" in curls[1] and " -o " in curls[1], curls
