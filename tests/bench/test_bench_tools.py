"""Short runs of bench/relay_overhead.py and bench/fuzz_tunnel.py: the tools
run end to end and print their tables. Their figures are never asserted."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from bench import fuzz_tunnel
from tests.harness import ROOT
from tunnel.frames import FrameDecoder, FrameType


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_short_relay_overhead_run_prints_every_row():
    r = run_tool("bench/relay_overhead.py", "--requests", "100", "--seconds", "0.5", "--mb", "2",
                 "--idle-agents", "10", "--idle-hold", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for row in ("GET / latency p50 ms (c=1)", "POST 100 KB latency p99 ms (c=1)", "POST 1 MB latency p50 ms (c=1)",
                "GET / req/s (c=16", "GET / req/s (c=32", "GET / req/s (c=64", "POST 100 KB req/s (c=32",
                "POST 1 MB req/s (c=32", "2 MB upload MB/s", "2 MB download MB/s", "edge RSS MB: idle / end / peak",
                "edge CPU %", "edge RSS MB with 10 idle agents", "Where the time goes", "GET / c=1 via edge"):
        assert row in r.stdout, f"missing row {row!r}:\n{r.stdout}"


def test_short_fuzz_run_sees_only_protocol_errors():
    r = run_tool("bench/fuzz_tunnel.py", "--inputs", "20000", "--seed", "3")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    for row in ("inputs/s", "outcomes", "exceptions other than ProtocolError", "limits exceeded",
                "RSS start -> end, peak (MB)", "mutated edge->agent", "random frames -> edge"):
        assert any(line.startswith(row) for line in lines), f"missing row {row!r}:\n{r.stdout}"
    other = next(line for line in lines if line.startswith("exceptions other than ProtocolError"))
    assert other.split()[4] == "0"


def test_fuzz_reports_any_other_exception_with_a_reproducer(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]):
    # A planted bug on a frame only malformed input has (a PING of the wrong
    # size): the tool must fail and print how to replay it.
    real = FrameDecoder._check_header

    def planted(self: FrameDecoder, ftype: int, flags: int, stream_id: int, length: int) -> FrameType:
        if ftype == FrameType.PING and length != 8:
            raise IndexError("planted")
        return real(self, ftype, flags, stream_id, length)

    monkeypatch.setattr(FrameDecoder, "_check_header", planted)
    assert fuzz_tunnel.main(["--inputs", "3000", "--progress", "0"]) == 1
    out = capsys.readouterr().out
    assert "FAILURE on input" in out and "IndexError: planted" in out
    assert "reproducer (" in out and "replay: python bench/fuzz_tunnel.py --seed 1 --replay " in out


def test_short_dataplane_run_prints_the_issue_table():
    r = run_tool("bench/dataplane.py", "--rounds", "1", "--requests", "40", "--seconds", "0.5", "--no-nginx")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if shutil.which("wrk") is None:
        assert "skipped, `wrk` is not installed" in r.stdout
        pytest.skip("wrk is not installed: the bench says so in one line and exits 0")
    for row in ("| direct (absolute) |", "| relay |", "GET +p50", "1 MB ratio", "CPU/1 MB",
                "edge CPU per GET", "CPU per 1 MB", "errors: none"):
        assert row in r.stdout, f"missing {row!r}:\n{r.stdout}"
