"""The live page (GET /live) in a real headless Chromium (Debian's, driven by
Playwright), streaming Chromium's fake camera to a real inference server.
Set LIVE_SCREENSHOT=docs/img/live.png to refresh the README's screenshot."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from .conftest import Server, start_server, vision_weights_missing

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
# The page repaints its figures every 250 ms from liveStats, and the label on
# each answer: wait until they show numbers, not for a fixed time.
FIGURES_PAINTED = """["#p50", "#p99", "#jitter", "#afps"].every(
    s => !isNaN(parseFloat(document.querySelector(s).textContent)))
    && parseFloat(document.querySelector("#p50").textContent) > 0
    && document.querySelector("#label").textContent !== '\u2014'"""


async def figures_painted(page) -> None:  # type: ignore[no-untyped-def]
    await page.wait_for_function(FIGURES_PAINTED, timeout=10_000)

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} missing: install the Debian package `chromium`")
pytest.importorskip("playwright", reason="needs the Python package playwright (test extra)")


async def figures_shown(page) -> None:  # type: ignore[no-untyped-def]
    """The label, and every figure a number (the median latency above 0)."""
    label = await page.text_content("#label")
    assert label and label != "—"
    for fig in ("#p50", "#p99", "#jitter", "#afps", "#server"):
        text = await page.text_content(fig)
        assert text is not None and float(text) >= 0, (fig, text)
    assert float(await page.text_content("#p50") or 0) > 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    s = start_server("onnxruntime", tmp_path_factory.mktemp("live-logs"), model_cache)
    try:
        yield s
    finally:
        s.proc.stop()


async def test_live_page_streams_the_camera_and_shows_label_latency_and_jitter(server: Server,
                                                                               tmp_path: Path) -> None:
    from playwright.async_api import async_playwright
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 620})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            # A key in the fragment: the page offers it as the subprotocol bearer.<KEY>
            # beside inference.v1, and the server (as the edge would) picks inference.v1.
            await page.goto(server.url + "/live#key=k-123&fps=15")
            assert await page.input_value("#key") == "k-123"
            assert await page.evaluate("subprotocols('k-123')") == ["inference.v1", "bearer.k-123"]
            assert await page.evaluate("subprotocols('')") == ["inference.v1"]
            await page.click("#start")
            await page.wait_for_function("window.liveStats.answered >= 40", timeout=90_000)
            await figures_painted(page)
            stats = await page.evaluate("({sent: liveStats.sent, answered: liveStats.answered, "
                                        "protocol: liveStats.protocol, jitter: liveStats.jitter})")
            assert stats["protocol"] == "inference.v1", stats
            await figures_shown(page)
            assert float(await page.text_content("#afps") or 0) > 0
            assert "streaming 15 fps" in (await page.text_content("#status") or "")
            shot = tmp_path / "live.png"
            await page.screenshot(path=str(shot))
            if target := os.environ.get("LIVE_SCREENSHOT"):
                shutil.copy(shot, target)
            await page.click("#start")  # stop
            await page.wait_for_function("window.liveStats.closed === 1000", timeout=10_000)
            assert not errors, errors
        finally:
            await browser.close()


async def test_live_page_talks_to_the_stream_next_to_its_own_url(server: Server) -> None:
    """Through the edge the page is /pools/x/live and must use /pools/x/stream."""
    from playwright.async_api import Route, async_playwright
    async with aiohttp.ClientSession() as s, s.get(server.url + "/live") as r:
        html = await r.text()

    async def serve(route: Route) -> None:
        await route.fulfill(status=200, content_type="text/html", body=html)

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = await browser.new_page()
            await page.route("**/pools/gpu/live", serve)
            await page.goto("http://edge.test:8443/pools/gpu/live#key=abc")
            assert await page.evaluate("streamUrl('none')") == "ws://edge.test:8443/pools/gpu/stream?drop=none"
            await page.route("https://edge.test/pools/gpu/live", serve)
            await page.goto("https://edge.test/pools/gpu/live")
            assert await page.evaluate("streamUrl('latest')") == "wss://edge.test/pools/gpu/stream?drop=latest"
        finally:
            await browser.close()


async def test_live_page_through_the_edge_authenticates_with_the_subprotocol_only(server: Server,
                                                                                  tmp_path: Path) -> None:
    """https://EDGE/pools/vision/live#key=KEY in a real browser: the page comes
    through the edge (--public-path /live), its WebSocket goes through the
    edge, tunnel and agent to /stream with the key only as the `bearer.KEY`
    subprotocol, answers come back and the figures show; the upstream never
    sees the key. The browser trusts the test CA through Playwright's
    `ignore_https_errors` (the context's certificate errors are ignored,
    page and WebSocket alike); a real deployment has a real certificate.
    Set LIVE_EDGE_SCREENSHOT=docs/img/live-edge.png to refresh the README's screenshot."""
    from playwright.async_api import async_playwright

    from tests.harness import System, make_pki, wait_for

    system = System(make_pki(tmp_path / "pki"), tmp_path)
    try:
        _, echo = await system.upstream("echo-upstream")
        _, edge = await system.edge("edge", None, "--public-path", "/live")
        system.agent("vision-agent", edge, server.url, pool="vision", capacity=4)
        system.agent("echo-agent", edge, echo, pool="echo")
        await system.wait_available(edge, ["vision-agent", "echo-agent"])
        key = system.pki.client_key
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                context = await browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 620})
                page = await context.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                response = await page.goto(f"{edge}/pools/vision/live#key={key}&fps=15")
                assert response is not None and response.status == 200
                assert await page.evaluate("streamUrl('latest')") == \
                    edge.replace("https://", "wss://") + "/pools/vision/stream?drop=latest"
                await page.click("#start")
                await page.wait_for_function("window.liveStats.answered >= 30", timeout=90_000)
                await figures_painted(page)
                assert await page.evaluate("liveStats.protocol") == "inference.v1"
                await figures_shown(page)
                assert "streaming 15 fps to wss://" in (await page.text_content("#status") or "")
                shot = tmp_path / "live-edge.png"
                await page.screenshot(path=str(shot))
                if target := os.environ.get("LIVE_EDGE_SCREENSHOT"):
                    shutil.copy(shot, target)
                await page.click("#start")  # stop
                await page.wait_for_function("window.liveStats.closed === 1000", timeout=10_000)
                assert not errors, errors
                # The key never left the browser but as the subprotocol, and
                # the edge kept it: the same browser form, to an upstream that
                # tells what its handshake carried.
                seen = await page.evaluate("""(url) => new Promise((resolve, reject) => {
                    const ws = new WebSocket(url, subprotocols($("key").value.trim()));
                    ws.onopen = () => ws.send("seen");
                    ws.onmessage = (e) => { resolve({protocol: ws.protocol, seen: JSON.parse(e.data)}); ws.close(); };
                    ws.onclose = (e) => reject("closed " + e.code);
                })""", edge.replace("https://", "wss://") + "/pools/echo/ws")
                assert seen["protocol"] == "inference.v1", seen
                assert seen["seen"]["protocols"] == "inference.v1", seen
                assert key not in str(seen["seen"]) and "bearer." not in str(seen["seen"]).lower(), seen
                # A wrong key: refused before any upgrade, and the page says so.
                code = await page.evaluate("""(url) => new Promise((resolve) => {
                    const ws = new WebSocket(url, subprotocols("eik_wrong"));
                    ws.onopen = () => resolve("opened");
                    ws.onclose = (e) => resolve(e.code);
                })""", edge.replace("https://", "wss://") + "/pools/vision/stream")
                assert code == 1006
            finally:
                await browser.close()

        async def refused_counted() -> bool:
            async with system.http().get(edge + "/_edge/metrics", headers=system.auth()) as r:
                return 'edge_rejections_total{reason="bad_key"}' in await r.text()

        await wait_for(refused_counted, 10, "the wrong key to be counted")
    finally:
        await system.close()


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    s = start_server("onnxruntime", tmp_path_factory.mktemp("live-vision-logs"), model_cache,
                     "--kinds", "detect,transform")
    try:
        yield s
    finally:
        s.proc.stop()


def y4m(photo: str, path: Path) -> Path:
    """A still photo as a 2-frame Y4M file, Chromium's fake camera source."""
    import numpy as np
    import skimage.data
    from PIL import Image
    img = Image.fromarray(getattr(skimage.data, photo)()).convert("RGB")
    w = 640
    h = round(img.size[1] * w / img.size[0] / 2) * 2
    ycc = np.asarray(img.resize((w, h)).convert("YCbCr"))
    planes = ycc[..., 0].tobytes() + ycc[::2, ::2, 1].tobytes() + ycc[::2, ::2, 2].tobytes()
    path.write_bytes(f"YUV4MPEG2 W{w} H{h} F30:1 Ip A1:1 C420jpeg\n".encode() + (b"FRAME\n" + planes) * 2)
    return path


@pytest.mark.parametrize("photo, fragment, check", [
    ("chelsea", "model=ssd-mobilenet-v2", "window.liveStats.boxes >= 10"),
    ("astronaut", "model=selfie-segmentation&mode=replace", "window.liveStats.images >= 15"),
])
@pytest.mark.skipif(bool(vision_weights_missing()), reason=vision_weights_missing() or "-")
async def test_live_page_draws_boxes_and_shows_transformed_frames(vision_server: Server, tmp_path: Path, photo: str,
                                                                  fragment: str, check: str) -> None:
    """The fake camera films a still photo: the cat gets its box drawn, the
    astronaut her background replaced."""
    from playwright.async_api import async_playwright
    camera = y4m(photo, tmp_path / f"{photo}.y4m")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=[*ARGS, f"--use-file-for-fake-video-capture={camera}"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 620})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{vision_server.url}/live#fps=15&{fragment}")
            await page.click("#start")
            await page.wait_for_function(check, timeout=90_000)
            await figures_painted(page)
            stats = await page.evaluate("({answered: liveStats.answered, errors: liveStats.errors, "
                                        "images: liveStats.images, boxes: liveStats.boxes, "
                                        "status: document.getElementById('status').textContent, "
                                        "shown: !document.getElementById('transformed').hidden})")
            label = await page.text_content("#label") or ""
            assert stats["errors"] == 0, stats
            if photo == "astronaut":
                # every image followed its JSON and was shown; the frame ends when its image is here
                assert stats["shown"] and stats["answered"] >= stats["images"] - 1, stats
                assert "model=selfie-segmentation&mode=replace" in stats["status"]
                coverage = int(label.split("person ")[1].split(" %")[0])
                assert 20 <= coverage <= 90, label
            else:
                assert stats["images"] == 0 and not stats["shown"]
                assert "model=ssd-mobilenet-v2" in stats["status"]
                assert label.startswith("Cat"), label
                # the box is drawn on the overlay canvas, sized as the frame sent
                drawn = await page.evaluate("(() => { const c = document.getElementById('boxes'); "
                                            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; "
                                            "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; "
                                            "return [c.width, n]; })()")
                assert drawn[0] == 320 and drawn[1] > 500, drawn
            assert float(await page.text_content("#p50") or 0) > 0
            await page.click("#start")
            await page.wait_for_function("window.liveStats.closed === 1000", timeout=10_000)
            assert not errors, errors
        finally:
            await browser.close()
