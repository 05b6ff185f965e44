"""The command line as a user runs it: JSON fields, the HTML report and its
plots, sweeps, compare/report, TLS, and every error path as one line with
no traceback (checked by the `loadtest` helper)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from loadtest import stats
from loadtest.runner import SAMPLES
from tests.harness import PY, ROOT
from tests.loadtest.conftest import TlsServer, loadtest

PLOTS = ("plot-latency-time", "plot-histogram", "plot-cdf", "plot-jitter-pdv", "plot-jitter-ipdv", "plot-throughput",
         "plot-hops")


def _check_stats(d: dict) -> None:
    for k in stats.FIELDS:
        assert k in d, k


def test_ping_writes_json_with_every_contract_field_and_a_self_contained_html(server: str, tmp_path: Path):
    out, page = tmp_path / "r.json", tmp_path / "r.html"
    r = loadtest("ping", "--url", server + "/chain?scale=0.2", "--rate", "50", "--duration", "3.2", "--warmup",
                 "0.3", "--json", str(out), "--html", str(page), "--records", "--label", "direct")
    assert r.returncode == 0, r.stderr
    assert "latency" in r.stdout and "net_edge_worker" in r.stdout
    res = json.loads(out.read_text())
    for k in ("requests", "errors", "throughput_rps", "latency_ms", "jitter_ms", "hops_ms", "config", "machine",
              "status_counts", "late_sends", "stability", "records"):
        assert k in res, k
    _check_stats(res["latency_ms"])
    _check_stats(res["jitter_ms"])
    for hop in ("decode", "preprocess", "queue", "infer", "postprocess", "app", "upstream", "agent", "lb", "tunnel",
                "edge", "net_edge_worker", "agent_overhead", "net_client_edge", "client_ttfb"):
        _check_stats(res["hops_ms"][hop])
    assert res["requests"] == 160 and res["errors"] == 0
    assert res["config"]["rate"] == 50 and res["config"]["api_key"] is None
    assert res["machine"]["cpus"] >= 1
    assert res["status_counts"] == {"200": 160}
    assert len(res["records"]) == 160 + 15
    assert res["label"] == "direct"

    html = page.read_text()
    for plot in PLOTS:
        assert f'id="{plot}"' in html, plot
    # Self-contained: no scripts, no external fetches.
    assert "<script" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert html.count("<svg") >= len(PLOTS)

    # `report` renders the same plots from the saved JSON alone.
    again = tmp_path / "again.html"
    r = loadtest("report", str(out), "--html", str(again))
    assert r.returncode == 0, r.stderr
    assert "latency" in r.stdout
    for plot in PLOTS:
        assert f'id="{plot}"' in again.read_text(), plot


def test_api_key_pool_and_request_ids_are_sent_and_the_key_is_not_stored(server: str, tmp_path: Path):
    out = tmp_path / "k.json"
    key = uuid.uuid4().hex
    r = loadtest("ping", "--url", f"{server}/echo-headers?key={key}", "--concurrency", "2", "--requests", "6",
                 "--warmup", "0", "--api-key", "secret-key-123", "--pool", "gpu", "--json", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "secret-key-123" not in text
    assert json.loads(text)["config"]["pool"] == "gpu"
    with urllib.request.urlopen(f"{server}/seen?key={key}", timeout=5) as resp:
        seen = json.loads(resp.read())
    assert len(seen) == 6
    assert all(h["Authorization"] == "Bearer secret-key-123" and h["X-Pool"] == "gpu" for h in seen)
    ids = [h["X-Request-ID"] for h in seen]
    assert len(set(ids)) == 6 and all(i.startswith("lt-") for i in ids)


def test_classify_posts_raw_image_bytes_and_refuses_answers_that_are_not_classifications(server: str):
    key = uuid.uuid4().hex
    r = loadtest("classify", "--url", f"{server}/echo-headers?key={key}", "--concurrency", "1", "--requests", "3",
                 "--warmup", "0", "--keep-going")
    assert r.returncode == 1
    assert "bad answer" in r.stdout and "POST /photo" in r.stderr
    with urllib.request.urlopen(f"{server}/seen?key={key}", timeout=5) as resp:
        seen = json.loads(resp.read())
    sizes = {p.stat().st_size for p in SAMPLES.glob("*.jpg")}
    assert len(seen) == 3
    assert all(h["Content-Type"] == "image/jpeg" and int(h["Content-Length"]) in sizes for h in seen)


def test_sweep_draws_the_curve_and_reports_the_knee(server: str, tmp_path: Path):
    out, page = tmp_path / "s.json", tmp_path / "s.html"
    r = loadtest("ping", "--url", server + "/trivial", "--sweep", "20,40,80", "--duration", "1", "--warmup", "0.2",
                 "--json", str(out), "--html", str(page))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    sw = res["sweep"]
    assert [p["offered_rps"] for p in sw["points"]] == [20, 40, 80]
    for p in sw["points"]:
        assert p["throughput_rps"] == pytest.approx(p["offered_rps"], rel=0.15)
    assert "knee_rps" in sw["knee"] and sw["knee"]["reason"]
    assert 'id="plot-sweep"' in page.read_text()
    assert "knee" in r.stdout


def test_compare_puts_runs_side_by_side(server: str, tmp_path: Path):
    a, b = tmp_path / "direct.json", tmp_path / "slow.json"
    assert loadtest("ping", "--url", server + "/trivial", "--concurrency", "2", "--requests", "40", "--warmup", "0",
                    "--json", str(a)).returncode == 0
    assert loadtest("ping", "--url", server + "/chain?scale=0.2", "--concurrency", "2", "--requests", "40",
                    "--warmup", "0", "--json", str(b)).returncode == 0
    r = loadtest("compare", str(a), str(b))
    assert r.returncode == 0, r.stderr
    assert "direct" in r.stdout and "slow" in r.stdout
    assert "latency p99" in r.stdout and "net_edge_worker" in r.stdout


def test_compare_of_a_missing_or_foreign_file_is_one_line(tmp_path: Path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    r = loadtest("compare", str(tmp_path / "nope.json"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot read" in r.stderr
    r = loadtest("report", str(tmp_path / "x.json"))
    assert r.returncode == 2 and "not a loadtest result" in r.stderr


@pytest.mark.parametrize(("path", "expect"), [
    ("/status/401", "401 Unauthorized: answering 401 on purpose, check --api-key"),
    ("/status/429", "429 Too Many Requests: answering 429 on purpose, rate limited"),
    ("/status/503", "503 Service Unavailable: answering 503 on purpose, no worker available"),
])
def test_http_errors_give_one_line_cause_a_report_and_exit_1(server: str, tmp_path: Path, path: str, expect: str):
    out = tmp_path / "e.json"
    r = loadtest("ping", "--url", server + path, "--rate", "20", "--duration", "30", "--warmup", "0",
                 "--json", str(out))
    assert r.returncode == 1
    cause = [ln for ln in r.stderr.splitlines() if ln.startswith("loadtest: error:")]
    assert len(cause) == 1 and expect in cause[0] and "on purpose" in cause[0]
    res = json.loads(out.read_text())
    assert res["ok"] == 0 and res["errors"] == res["requests"] >= 10  # what was measured
    assert res["status_counts"] == {path.rsplit("/", 1)[1]: res["requests"]}
    assert res["aborted"]  # stopped early instead of 30 s of failures
    assert "requests" in r.stdout  # the summary still printed


def test_unreachable_url_is_one_line_and_exit_1(tmp_path: Path):
    from tests.harness import free_port

    r = loadtest("ping", "--url", f"http://127.0.0.1:{free_port()}/", "--rate", "50", "--duration", "5",
                 "--warmup", "0")
    assert r.returncode == 1
    assert "cannot connect" in r.stderr and "Connection refused" in r.stderr


def test_tls_without_the_ca_is_a_clear_failure(tls_server: TlsServer):
    r = loadtest("ping", "--url", tls_server.url + "/trivial", "--rate", "50", "--duration", "5", "--warmup", "0")
    assert r.returncode == 1
    line = next(ln for ln in r.stderr.splitlines() if "error:" in ln)
    assert "TLS failure" in line and "certificate verify failed" in line and "--ca" in line


def test_tls_with_the_ca_measures_connect_and_handshake(tls_server: TlsServer, tmp_path: Path):
    out = tmp_path / "t.json"
    # No warm-up and several connections, so handshakes are among the measured requests.
    r = loadtest("ping", "--url", tls_server.url + "/trivial", "--ca", str(tls_server.ca), "--concurrency", "4",
                 "--requests", "40", "--warmup", "0", "--json", str(out))
    assert r.returncode == 0, r.stderr
    hops = json.loads(out.read_text())["hops_ms"]
    assert hops["client_connect"]["count"] >= 4
    assert hops["client_tls"]["count"] >= 4
    assert hops["client_tls"]["p50"] > 0


def test_insecure_skips_verification_and_says_so(tls_server: TlsServer):
    r = loadtest("ping", "--url", tls_server.url + "/trivial", "--insecure", "--concurrency", "1", "--requests", "5",
                 "--warmup", "0")
    assert r.returncode == 0, r.stderr
    assert "NOT verified" in r.stderr


@pytest.mark.parametrize("args", [
    ["ping", "--url", "ftp://x/", "--rate", "1", "--requests", "1"],
    ["ping", "--url", "http://127.0.0.1:1/", "--rate", "1", "--requests", "1", "--ca", "/nonexistent/ca.pem"],
    ["classify", "--url", "http://127.0.0.1:1/", "--rate", "1", "--requests", "1", "--images", "/nonexistent"],
    ["ping", "--url", "http://127.0.0.1:1/", "--rate", "1", "--requests", "1", "--json", "/nonexistent/dir/x.json"],
])
def test_bad_options_are_one_line_and_exit_2(args: list[str]):
    r = loadtest(*args)
    assert r.returncode == 2
    assert r.stderr.startswith("loadtest: error:") and r.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [
    ["ping", "--url", "http://x/", "--requests", "1"],  # no load model
    ["ping", "--url", "http://x/", "--rate", "1"],  # no end
    ["ping", "--url", "http://x/", "--rate", "1", "--concurrency", "2", "--requests", "1"],
    ["ping", "--url", "http://x/", "--rate", "-5", "--requests", "1"],
    ["ping", "--url", "http://x/", "--sweep", "10,abc", "--requests", "1"],
])
def test_usage_errors_exit_2(args: list[str]):
    r = loadtest(*args)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_help_lists_every_option():
    r = loadtest("ping", "--help")
    for opt in ("--url", "--api-key", "--ca", "--pool", "--insecure", "--rate", "--arrivals", "--concurrency",
                "--duration", "--requests", "--warmup", "--sweep", "--json", "--html", "--images", "--records"):
        assert opt in r.stdout, opt


def test_ctrl_c_ends_the_run_and_still_reports_what_was_measured(server: str, tmp_path: Path):
    out = tmp_path / "i.json"
    key = uuid.uuid4().hex
    p = subprocess.Popen([PY, "-m", "loadtest", "ping", "--url", f"{server}/co?key={key}", "--rate", "100",
                          "--duration", "60", "--warmup", "0", "--json", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and p.poll() is None:
            with urllib.request.urlopen(f"{server}/count?key={key}", timeout=2) as r:
                if int(r.read()) >= 100:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError(f"no load seen from loadtest: {p.poll()}")
        os.kill(p.pid, signal.SIGINT)
        stdout, stderr = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "Traceback" not in stderr
    assert p.returncode == 0, stderr
    res = json.loads(out.read_text())
    assert 100 <= res["requests"] < 5000
    assert "requests" in stdout
