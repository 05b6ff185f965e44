"""The edge inspector in a real headless Chromium (Debian's, driven by
Playwright) against a real edge, agents and upstreams: sign in with an admin
key, watch a worker go unhealthy with its reason, see a 503 arrive in the
recent requests and open its detail, see a 200's hops as a waterfall.
Set INSPECTOR_SCREENSHOT=docs/img/inspector.png to refresh the README's screenshot."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

import pytest

from tests.harness import System

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} missing: install the Debian package `chromium`")
pytest.importorskip("playwright", reason="needs the Python package playwright (test extra)")


async def _chatter(system: System, edge: str, stop: asyncio.Event) -> None:
    """One open WebSocket sending a message every 50 ms, for the sockets panel."""
    async with system.http().ws_connect(edge + "/ws", headers=system.auth()) as ws:
        while not stop.is_set():
            await ws.send_str("tick")
            await ws.receive(timeout=5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)


async def test_sign_in_see_a_worker_turn_unhealthy_with_its_reason_and_a_503_arrive(system: System,
                                                                                    tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    _, up1 = await system.upstream("up1")
    _, up2 = await system.upstream("up2")
    _, edge = await system.edge()
    system.agent("gpu-box-1", edge, up1, pool="default")
    system.agent("lab-2", edge, up2, pool="lab")
    await system.wait_available(edge, ["gpu-box-1", "lab-2"])
    http = system.http()
    for i in range(12):
        async with http.post(edge + f"/echo?i={i}", data=b"x" * 1000, headers=system.auth()) as r:
            assert r.status == 200
        async with http.get(edge + "/", headers={**system.auth(), "X-Pool": "lab"}) as r:
            assert r.status == 200
    async with http.get(edge + "/missing", headers={**system.auth(), "X-Pool": "lab"}) as r:
        assert r.status == 404
    stop = asyncio.Event()
    chatter = asyncio.create_task(_chatter(system, edge, stop))

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            context = await browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 1000})
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # Console errors but the refused sign-in below (a 403 the page shows on purpose).
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "status of 403" not in m.text
                    else None)

            await page.goto(edge + "/_edge/")
            assert page.url.endswith("/_edge/login")  # a browser is sent to the form, not a JSON 401
            await page.fill("#key", system.pki.plain_key)
            await page.click("button[type=submit]")
            assert "not an admin key" in (await page.text_content(".error") or "")
            await page.fill("#key", system.pki.client_key)
            await page.click("button[type=submit]")
            await page.wait_for_url("**/_edge/")
            assert await page.text_content("#user") == "tester"
            cookie = next(c for c in await context.cookies() if c["name"] == "edge_session")
            assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"

            await page.wait_for_selector("#live:text('live')", timeout=15_000)
            await page.wait_for_selector("#workers td:text('gpu-box-1') >> xpath=.. >> td.healthy", timeout=15_000)
            await page.wait_for_selector("#sockets td:text('/ws')", timeout=15_000)
            await page.wait_for_function(
                "Array.from(document.querySelectorAll('#pools tbody tr')).some("
                "r => r.cells[0].textContent === 'default' && Number(r.cells[7].textContent) > 0)", timeout=15_000)

            # The upstream of gpu-box-1 says it is unhealthy: the page shows it, with why.
            async with http.get(up1 + "/set-health/down") as r:
                assert r.status == 200
            row = page.locator("#workers tr", has_text="gpu-box-1")
            await row.locator("td.unhealthy").wait_for(timeout=20_000)
            why = await row.locator("td.why").first.text_content() or ""
            assert "503" in why or "unhealthy" in why, why

            # Its pool has no healthy worker left: the next request gets 503, and it shows up.
            async with http.post(edge + "/echo?token=SECRET", data=b"y", headers=system.auth()) as r:
                assert r.status == 503
                rid = r.headers["X-Request-ID"]
            await page.fill("#f-status", "5xx")
            await page.locator(f"#requests tr[data-id='{rid}']").wait_for(timeout=15_000)
            shown = page.locator("#requests tbody tr")
            assert await shown.count() == 1  # the filter keeps only the 503
            await shown.first.click()
            assert await page.text_content("#d-id") == rid
            detail = await page.text_content("#d-fields") or ""
            assert "503" in detail and "query string dropped" in detail and "SECRET" not in detail
            assert "no worker was reached" in (await page.text_content("#d-note") or "")

            # A 200 of the healthy pool: its hops as a waterfall.
            await page.fill("#f-status", "2xx")
            await page.select_option("#f-pool", "default")
            await page.locator("#requests tbody tr").first.click()
            names = await page.locator("#d-waterfall .name").all_text_contents()
            assert names[:5] == ["edge", "lb", "tunnel", "agent", "upstream"], names
            assert "app" in names
            assert "SECRET" not in (await page.content())
            assert not errors, errors  # no script error, no CSP violation

            await page.select_option("#f-pool", "")
            await page.fill("#f-status", "")
            await page.locator("#requests tbody tr", has_text="gpu-box-1").first.click()
            shot = tmp_path / "inspector.png"
            await page.screenshot(path=str(shot), full_page=True)
            if target := os.environ.get("INSPECTOR_SCREENSHOT"):
                shutil.copy(shot, target)

            await page.click("#logout button")
            await page.wait_for_url("**/_edge/login")
            await page.goto(edge + "/_edge/")
            assert page.url.endswith("/_edge/login")  # signed out
        finally:
            await browser.close()
            stop.set()
            await asyncio.gather(chatter, return_exceptions=True)
