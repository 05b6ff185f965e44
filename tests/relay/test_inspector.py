"""The edge inspector over real HTTPS (issue 19): sign-in with admin keys
only, the session cookie and its CSRF rules, header auth for scripts, what
the recent-requests ring keeps (and does not), the SSE feed, and the metrics
label of unknown pools."""

from __future__ import annotations

import json
from http.cookies import SimpleCookie

from bench.procstats import metric
from tests.harness import System, wait_for


async def _stack(system: System, *edge_args: str) -> str:
    _, up = await system.upstream()
    _, edge = await system.edge("edge", None, *edge_args)
    system.agent("w1", edge, up)
    await system.wait_available(edge, ["w1"])
    return edge


async def _sign_in(system: System, edge: str, key: str, origin: str | None = None):  # type: ignore[no-untyped-def]
    headers = {"Origin": origin} if origin else {}
    r = await system.http().post(edge + "/_edge/login", data={"key": key}, headers=headers, allow_redirects=False)
    text = await r.text()
    r.release()
    return r, text


def _session_cookie(r) -> tuple[str, SimpleCookie]:  # type: ignore[no-untyped-def]
    jar = SimpleCookie()
    for value in r.headers.getall("Set-Cookie", []):
        jar.load(value)
    return jar["edge_session"].value, jar


async def test_unknown_pools_share_one_metrics_label_whatever_the_client_sends(system: System) -> None:
    edge = await _stack(system)
    http = system.http()
    for i in range(5):
        async with http.get(edge + "/", headers={**system.auth(), "X-Pool": f"made-up-{i}"}) as r:
            assert r.status == 404
    async with http.get(edge + "/pools/also-made-up/x", headers=system.auth()) as r:
        assert r.status == 404
    async with http.get(edge + "/_edge/metrics", headers=system.auth()) as r:
        text = await r.text()
    assert "made-up" not in text
    assert metric(text, 'edge_requests_total{pool="_unknown",status="404"}') == 6
    assert metric(text, 'edge_request_duration_seconds_count{pool="_unknown"}') == 6


async def test_a_browser_is_sent_to_the_sign_in_form_and_only_an_admin_key_signs_in(system: System) -> None:
    edge = await _stack(system)
    http = system.http()
    async with http.get(edge + "/_edge/", headers={"Accept": "text/html"}, allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/_edge/login"
    async with http.get(edge + "/_edge/login") as r:
        assert r.status == 200 and 'name="key"' in await r.text()
    async with http.get(edge + "/_edge/api/overview") as r:  # a script without a key: JSON 401, no redirect
        assert r.status == 401 and r.content_type == "application/problem+json"

    r, text = await _sign_in(system, edge, system.pki.plain_key)
    assert r.status == 403 and "not an admin key" in text and "--admin" in text
    assert not r.headers.getall("Set-Cookie", [])
    r, text = await _sign_in(system, edge, "eik_wrong")
    assert r.status == 401 and "not a valid client key" in text and not r.headers.getall("Set-Cookie", [])
    r, text = await _sign_in(system, edge, system.pki.client_key, origin="https://evil.example")
    assert r.status == 403 and not r.headers.getall("Set-Cookie", [])

    r, _ = await _sign_in(system, edge, system.pki.client_key, origin=edge)
    assert r.status == 303 and r.headers["Location"] == "/_edge/"
    value, jar = _session_cookie(r)
    morsel = jar["edge_session"]
    assert morsel["secure"] and morsel["httponly"] and morsel["samesite"] == "Strict"
    assert morsel["path"] == "/_edge" and int(morsel["max-age"]) == 8 * 3600
    assert system.pki.client_key not in value
    cookie = {"Cookie": f"edge_session={value}"}
    async with http.get(edge + "/_edge/", headers=cookie) as r:
        page = await r.text()
        assert r.status == 200 and "Edge inspector" in page and "tester" in page
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    async with http.get(edge + "/_edge/api/overview", headers=cookie) as r:
        assert r.status == 200 and [w["id"] for w in (await r.json())["workers"]] == ["w1"]
    async with http.get(edge + "/", headers=cookie) as r:
        assert r.status == 401  # the session opens the inspector, never the proxied paths
    forged = value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB")
    async with http.get(edge + "/_edge/api/overview", headers={"Cookie": f"edge_session={forged}"}) as r:
        assert r.status == 401

    # Sign-out is a POST that needs the page's CSRF token.
    async with http.post(edge + "/_edge/logout", headers=cookie, allow_redirects=False) as r:
        assert r.status == 403 and (await r.json())["code"] == "csrf"
    csrf = page.split('name="csrf" content="', 1)[1].split('"', 1)[0]
    async with http.post(edge + "/_edge/logout", headers={**cookie, "Origin": "https://evil.example"},
                         data={"csrf": csrf}, allow_redirects=False) as r:
        assert r.status == 403
    async with http.post(edge + "/_edge/logout", headers=cookie, data={"csrf": csrf}, allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/_edge/login"
        assert "edge_session=" in r.headers["Set-Cookie"]  # cleared
    async with http.get(edge + "/_edge/api/overview", headers=cookie) as r:
        assert r.status == 401  # a kept copy of the cookie no longer works


async def test_header_keys_still_open_every_admin_page_for_scripts(system: System) -> None:
    edge = await _stack(system)
    http = system.http()
    for path in ("/_edge/", "/_edge/api/overview", "/_edge/api/requests", "/_edge/workers", "/_edge/metrics"):
        async with http.get(edge + path, headers=system.auth()) as r:
            assert r.status == 200, path
        async with http.get(edge + path, headers={"X-API-Key": system.pki.plain_key}) as r:
            assert r.status == 403, path
    async with http.get(edge + "/_edge/static/inspector.js") as r:  # public: no secret in it
        assert r.status == 200 and r.content_type == "text/javascript"
    async with http.get(edge + "/_edge/static/../workers") as r:
        assert r.status in (401, 404)
    async with http.get(edge + "/_edge/static/nope.js") as r:
        assert r.status == 404


async def test_recent_requests_keep_no_query_string_and_name_the_key_worker_and_hops(system: System) -> None:
    edge = await _stack(system)
    http = system.http()
    async with http.post(edge + "/echo?api_key=SECRET-IN-QUERY", data=b"body-SECRET",
                         headers=system.auth()) as r:
        assert r.status == 200
        rid = r.headers["X-Request-ID"]
    async with http.get(edge + "/nothing-here", headers={**system.auth(), "X-Pool": "nope"}) as r:
        assert r.status == 404

    async with http.get(edge + "/_edge/api/requests", headers=system.auth()) as r:
        raw = await r.text()
    assert "SECRET" not in raw and system.pki.client_key not in raw
    found = json.loads(raw)["requests"]
    assert [x["status"] for x in found] == [404, 200]  # newest first
    echo = found[1]
    assert (echo["request_id"], echo["method"], echo["path"], echo["query"]) == (rid, "POST", "/echo", True)
    assert (echo["pool"], echo["worker"], echo["key"]) == ("default", "w1", "tester")
    hops = dict(echo["timing"])
    assert {"lb", "tunnel", "agent", "upstream", "app", "edge"} <= set(hops)
    assert hops["edge"] <= echo["duration_ms"] + 0.5
    assert (found[0]["pool"], found[0]["worker"]) == ("_unknown", "")

    async def get(query: str) -> list[dict[str, object]]:
        async with http.get(edge + "/_edge/api/requests?" + query, headers=system.auth()) as r:
            return (await r.json())["requests"]

    assert [x["status"] for x in await get("status=4xx")] == [404]
    assert [x["status"] for x in await get("worker=w1")] == [200]
    assert [x["status"] for x in await get("pool=_unknown")] == [404]
    async with http.get(edge + f"/_edge/api/requests?id={rid}", headers=system.auth()) as r:
        assert (await r.json())["request_id"] == rid
    async with http.get(edge + "/_edge/api/requests?after=x", headers=system.auth()) as r:
        assert r.status == 400 and (await r.json())["code"] == "bad_request"

    async with http.get(edge + "/_edge/api/overview", headers=system.auth()) as r:
        pools = {p["name"]: p for p in (await r.json())["pools"]}
    assert pools["default"]["minute"]["by_class"]["2xx"] == 1 and pools["default"]["minute"]["p50_ms"] > 0
    assert pools["_unknown"]["minute"]["by_class"]["4xx"] == 1 and not pools["_unknown"]["known"]


async def test_the_ring_is_bounded_by_its_option_and_0_turns_it_off(system: System) -> None:
    edge = await _stack(system, "--inspector-requests", "3")
    edge_proc = next(p for p in system.procs if p.name == "edge")
    port = edge.rsplit(":", 1)[1]
    assert f"inspector: https://127.0.0.1:{port}/_edge/" in edge_proc.log()  # serve names the URL
    assert "keeps the last 3 requests" in edge_proc.log()
    http = system.http()
    for i in range(5):
        async with http.get(edge + f"/?n={i}", headers=system.auth()) as r:
            assert r.status == 200
    async with http.get(edge + "/_edge/api/requests", headers=system.auth()) as r:
        assert len((await r.json())["requests"]) == 3
    _, off = await system.edge("off", None, "--inspector-requests", "0")
    async with http.get(off + "/_edge/api/requests", headers=system.auth()) as r:
        answer = await r.json()
        assert answer["requests"] == [] and "off" in answer["recorder"]


async def test_the_event_stream_sends_the_overview_and_new_requests(system: System) -> None:
    edge = await _stack(system)
    http = system.http()
    async with http.get(edge + "/", headers=system.auth()) as r:
        assert r.status == 200
    async with http.get(edge + "/_edge/events", headers=system.auth()) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        updates: list[dict[str, object]] = []

        async def two_updates() -> bool:
            line = (await r.content.readline()).decode()
            if line.startswith("data: "):
                updates.append(json.loads(line[6:]))
            return len(updates) >= 2

        await wait_for(two_updates, 10, "two SSE updates", interval=0)
    first, second = updates
    assert [x["path"] for x in first["requests"]] == ["/"]  # type: ignore[index]
    assert second["requests"] == [] and second["last_seq"] == first["last_seq"]  # only what is new
    assert {"pools", "workers", "websockets", "edge"} <= set(first)
