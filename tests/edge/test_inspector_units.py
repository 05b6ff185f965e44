"""The inspector's pure parts with a fake clock: rolling statistics, message
rates, the recent-requests ring, and the browser session cookie (expiry,
tampering, sign-out, CSRF)."""

from __future__ import annotations

import pytest

from edge_proxy.browser_session import SessionSigner, same_origin
from edge_proxy.inspector import Inspector, RecentRequests, status_matches, strip_query
from edge_proxy.rolling import BOUNDS, RateWindow, RollingStats, status_class

T0 = 10_000.0  # a monotonic clock far from zero, not aligned to a minute


# ------------------------------------------------------------------------------------------ rolling statistics
@pytest.mark.parametrize(("events", "now", "minute", "hour"), [
    # events: (seconds after T0, status); expected (count, 2xx, 4xx, 5xx) in each window
    ([], 30, (0, 0, 0, 0), (0, 0, 0, 0)),
    ([(0, 200), (1, 404), (2, 503)], 3, (3, 1, 1, 1), (3, 1, 1, 1)),
    ([(0, 200)], 59.5, (1, 1, 0, 0), (1, 1, 0, 0)),  # still inside the minute
    ([(0, 200)], 61, (0, 0, 0, 0), (1, 1, 0, 0)),  # out of the minute, inside the hour
    ([(0, 200), (61, 500)], 62, (1, 0, 0, 1), (2, 1, 0, 1)),  # the slot of second 0 was reused: no ghost
    ([(0, 200)], 3540, (0, 0, 0, 0), (1, 1, 0, 0)),
    ([(0, 200)], 3700, (0, 0, 0, 0), (0, 0, 0, 0)),  # out of the hour too
    ([(0, 200), (3700, 429)], 3701, (1, 0, 1, 0), (1, 0, 1, 0)),  # a reused minute slot is cleared first
    ([(0, 101), (0, 204), (0, 302), (0, 999)], 1, (4, 1, 0, 1), (4, 1, 0, 1)),  # 999 is no status: 5xx
])
def test_rolling_windows_count_by_status_class_and_forget_what_left_them(
        events: list[tuple[float, int]], now: float, minute: tuple[int, ...], hour: tuple[int, ...]) -> None:
    stats = RollingStats(started=T0)
    for at, status in events:
        stats.record(T0 + at, status, 0.01)
    for got, want in ((stats.last_minute(T0 + now), minute), (stats.last_hour(T0 + now), hour)):
        assert (got.count, got.by_class["2xx"], got.by_class["4xx"], got.by_class["5xx"]) == want


def test_rates_are_per_second_the_edge_has_been_up_not_per_full_window() -> None:
    stats = RollingStats(started=T0)
    for i in range(20):
        stats.record(T0 + i * 0.5, 200, 0.01)  # 2/s for 10 s
    young = stats.last_minute(T0 + 10)
    assert young.covered_s == pytest.approx(10) and young.rate == pytest.approx(2.0)
    assert stats.last_hour(T0 + 10).rate == pytest.approx(2.0)
    later = stats.last_minute(T0 + 100)  # nothing in the last minute, a full minute covered
    assert later.covered_s == pytest.approx(60, abs=1) and later.rate == 0


def test_percentiles_come_from_the_fixed_buckets_within_one_bucket() -> None:
    stats = RollingStats(started=T0)
    for ms in range(1, 101):  # 1..100 ms, once each
        stats.record(T0 + 1, 200, ms / 1000)
    w = stats.last_minute(T0 + 2)
    assert w.p50_ms is not None and w.p99_ms is not None
    assert 50 / 1.25 <= w.p50_ms <= 50 * 1.25
    assert 99 / 1.25 <= w.p99_ms <= 100  # never above the largest observed
    h = stats.last_hour(T0 + 2)
    assert (h.p50_ms, h.p99_ms) == (w.p50_ms, w.p99_ms)  # the same samples, the same buckets


def test_websocket_sessions_count_but_give_no_latency_sample() -> None:
    stats = RollingStats(started=T0)
    stats.record(T0, 101, None)
    w = stats.last_minute(T0 + 1)
    assert w.count == 1 and w.by_class["1xx"] == 1 and w.p50_ms is None and w.p99_ms is None


def test_a_latency_beyond_the_last_bucket_is_kept_as_observed() -> None:
    stats = RollingStats(started=T0)
    stats.record(T0, 200, BOUNDS[-1] * 2)
    assert stats.last_minute(T0).p99_ms == pytest.approx(BOUNDS[-1] * 2 * 1000)


@pytest.mark.parametrize(("status", "cls"), [(101, "1xx"), (200, "2xx"), (499, "4xx"), (503, "5xx"), (0, "5xx")])
def test_status_class(status: int, cls: str) -> None:
    assert status_class(status) == cls


def test_message_rate_over_the_last_seconds() -> None:
    r = RateWindow(started=T0, span=10)
    assert r.rate(T0 + 0.01) == 0
    r.add(T0 + 0.01)
    assert r.rate(T0 + 0.02) == 1.0  # at least one second covered: not 100/s
    for i in range(30):
        r.add(T0 + 1 + i * 0.1)  # 10/s for 3 s
    assert r.rate(T0 + 4) == pytest.approx(31 / 4)
    assert r.rate(T0 + 30) == 0 and r.total == 31  # the window forgot; the total did not


# ------------------------------------------------------------------------------------------ recent requests
def _add(ring: RecentRequests, i: int, status: int = 200, pool: str = "p", worker: str = "w") -> None:
    ring.add(at=float(i), request_id=f"r{i}", method="GET", path="/x", query=False, pool=pool, worker=worker,
             status=status, duration_ms=1.0, key="k", server_timing="", websocket=False)


def test_the_ring_keeps_the_last_n_newest_first_and_filters() -> None:
    ring = RecentRequests(3)
    for i, (status, pool, worker) in enumerate([(200, "a", "w1"), (503, "a", "w2"), (404, "b", "w1"),
                                                (200, "b", "w2"), (502, "a", "w1")]):
        _add(ring, i, status, pool, worker)
    assert [r.request_id for r in ring.query()] == ["r4", "r3", "r2"]  # r0, r1 dropped
    assert ring.find("r1") is None and ring.find("r2") is not None
    assert [r.request_id for r in ring.query(status="5xx")] == ["r4"]
    assert [r.request_id for r in ring.query(status="errors")] == ["r4", "r2"]
    assert [r.request_id for r in ring.query(pool="b")] == ["r3", "r2"]
    assert [r.request_id for r in ring.query(worker="w1", status="404")] == ["r2"]
    assert [r.request_id for r in ring.query(after=4)] == ["r4"] and ring.last_seq == 5  # seq counts from 1
    assert [r.request_id for r in ring.query(limit=1)] == ["r4"]


@pytest.mark.parametrize(("status", "wanted", "match"), [
    (503, "", True), (503, "503", True), (503, "5xx", True), (503, "5XX", True), (503, "errors", True),
    (200, "errors", False), (404, "5xx", False), (503, "50", False), (503, "junk", False),
])
def test_status_filter(status: int, wanted: str, match: bool) -> None:
    assert status_matches(status, wanted) is match


def test_the_query_string_is_dropped_and_long_paths_cut() -> None:
    assert strip_query("/photo?api_key=secret&x=1") == ("/photo", True)
    assert strip_query("/photo") == ("/photo", False)
    path, _ = strip_query("/" + "a" * 1000)
    assert len(path) == 256 + 3 and path.endswith("...")


def test_recorder_off_still_keeps_statistics() -> None:
    insp = Inspector(0, T0)
    insp.record(T0 + 1, 0.0, request_id="r", method="GET", raw_path="/?k=v", pool="p", worker="w", status=200,
                duration=0.01, key="k", server_timing="", websocket=False)
    assert insp.recent is None
    windows = insp.windows("p", T0 + 2)
    assert windows is not None and windows[0].count == 1


# ------------------------------------------------------------------------------------------ session cookies
def test_a_session_cookie_names_its_key_and_expires() -> None:
    signer = SessionSigner(ttl=60)
    cookie, session = signer.issue("ops", now=1000)
    assert "ops" not in cookie  # encoded, and the key itself is never in it
    assert signer.verify(cookie, 1059.9) == session and session.name == "ops"
    assert signer.verify(cookie, 1060) is None  # expired


@pytest.mark.parametrize("tamper", [
    lambda c: c[:-2] + ("A" if c[-2] != "A" else "B") + c[-1],  # the MAC
    lambda c: c.replace(".", ".x", 1),  # the name
    lambda c: ".".join([*c.split(".")[:2], str(int(c.split(".")[2]) + 3600), *c.split(".")[3:]]),  # expiry
    lambda c: "v2" + c[2:],
    lambda c: c + ".extra",
    lambda c: "",
    lambda c: "x" * 5000,
])
def test_a_tampered_cookie_is_refused(tamper) -> None:  # type: ignore[no-untyped-def]
    signer = SessionSigner(ttl=60)
    cookie, _ = signer.issue("ops", now=1000)
    assert signer.verify(tamper(cookie), 1001) is None


def test_another_process_secret_and_a_signed_out_session_are_refused() -> None:
    a, b = SessionSigner(ttl=60), SessionSigner(ttl=60)
    cookie, session = a.issue("ops", now=1000)
    assert b.verify(cookie, 1001) is None  # a restart (new secret) signs everyone out
    a.revoke(session, now=1001)
    assert a.verify(cookie, 1002) is None
    other, _ = a.issue("ops", now=1002)
    assert a.verify(other, 1003) is not None  # only that session ended
    a.revoke(a.issue("x", 5000)[1], now=5000)
    assert session.nonce not in a._revoked  # expired revocations are forgotten: bounded memory


def test_csrf_token_is_bound_to_its_session() -> None:
    signer = SessionSigner(ttl=60)
    _, s1 = signer.issue("ops", now=1000)
    _, s2 = signer.issue("ops", now=1000)
    t1 = signer.csrf_token(s1)
    assert signer.csrf_ok(s1, t1)
    assert not signer.csrf_ok(s2, t1) and not signer.csrf_ok(s1, None) and not signer.csrf_ok(s1, "")


@pytest.mark.parametrize(("origin", "host", "ok"), [
    (None, "edge:8443", True),  # scripts send no Origin; the CSRF token still applies
    ("https://edge:8443", "edge:8443", True),
    ("https://EDGE:8443", "edge:8443", True),
    ("http://edge:8443", "edge:8443", True),  # behind a TLS-terminating balancer
    ("https://evil.example", "edge:8443", False),
    ("https://edge:9999", "edge:8443", False),
    ("null", "edge:8443", False),
    ("https://edge:8443", None, False),
])
def test_same_origin(origin: str | None, host: str | None, ok: bool) -> None:
    assert same_origin(origin, host) is ok


def test_hops_are_read_from_the_kept_server_timing_and_a_huge_header_is_cut() -> None:
    insp = Inspector(10, T0)
    insp.record(T0, 0.0, request_id="r", method="GET", raw_path="/", pool="p", worker="w", status=200,
                duration=0.01, key="k", server_timing="app;dur=0.5, agent;dur=1.25, edge;dur=3", websocket=False)
    insp.record(T0, 0.0, request_id="big", method="GET", raw_path="/", pool="p", worker="w", status=200,
                duration=0.01, key="k", server_timing="x;dur=1, " * 10_000, websocket=False)
    assert insp.recent is not None
    rec = insp.recent.find("r")
    assert rec is not None and rec.as_json()["timing"] == [["app", 0.5], ["agent", 1.25], ["edge", 3.0]]
    big = insp.recent.find("big")
    assert big is not None and len(big.server_timing) == 2048
