"""The inference service over HTTP, on every backend, with real weights and
real photos."""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
from pathlib import Path

import aiohttp
import pytest

from httpcontract import problem
from tests.harness import PY, ROOT

from .conftest import BACKENDS, Server, start_server

CAT_CLASSES = {"tabby", "tiger_cat", "Egyptian_cat", "Persian_cat", "Siamese_cat", "lynx"}
COFFEE_CLASSES = {"espresso", "cup", "coffee_mug"}
TIMING = ("decode", "preprocess", "queue", "infer", "postprocess", "app")


def server_timing(header: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"([\w-]+);dur=([0-9.]+)", header)}


async def post(session: aiohttp.ClientSession, url: str, body: bytes, **headers: str) -> tuple[int, dict, dict]:
    async with session.post(url + "/photo", data=body, headers=headers) as r:
        return r.status, await r.json(), dict(r.headers)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_photos_are_classified_over_http(servers: dict[str, Server], photos: dict[str, bytes],
                                               backend: str) -> None:
    url = servers[backend].url
    async with aiohttp.ClientSession() as s:
        status, cat, headers = await post(s, url, photos["chelsea"], **{"X-Request-ID": "req-cat-1"})
        assert status == 200, cat
        assert cat["label"] in CAT_CLASSES, cat
        assert cat["message"] == "success"
        assert cat["inference"] == f"Predicted = {cat['label']}, Confidence = {cat['confidence']:.3f}"
        assert cat["backend"] == backend and cat["model"] == "efficientnet-lite0"
        assert [t["label"] for t in cat["top5"]][0] == cat["label"] and len(cat["top5"]) == 5
        assert sum(t["probability"] for t in cat["top5"]) <= 1.0001
        assert headers["X-Request-ID"] == "req-cat-1"
        timing = server_timing(headers["Server-Timing"])
        assert set(TIMING) <= set(timing)
        assert timing["app"] >= timing["infer"] and timing["app"] >= timing["decode"]

        status, coffee, _ = await post(s, url, photos["coffee"])
        assert status == 200 and coffee["label"] in COFFEE_CLASSES, coffee
        if coffee["label"] == "espresso":
            assert coffee["confidence"] > 0.5


async def test_all_backends_agree_on_top1(servers: dict[str, Server], photos: dict[str, bytes]) -> None:
    async with aiohttp.ClientSession() as s:
        for name, body in photos.items():
            answers = {b: (await post(s, servers[b].url, body))[1] for b in BACKENDS}
            labels = {b: a["label"] for b, a in answers.items()}
            assert len(set(labels.values())) == 1, f"{name}: {labels}"
            confs = [a["confidence"] for a in answers.values()]
            assert max(confs) - min(confs) < 1e-3, f"{name}: {confs}"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_concurrent_mixed_images_each_get_their_own_answer(servers: dict[str, Server],
                                                                 photos: dict[str, bytes], backend: str) -> None:
    url = servers[backend].url
    async with aiohttp.ClientSession() as s:
        expected = {name: (await post(s, url, body))[1]["label"] for name, body in photos.items()}
        order = [name for _ in range(8) for name in photos]  # 24 requests, interleaved
        results = await asyncio.gather(*(post(s, url, photos[name], **{"X-Request-ID": f"{name}-{i}"})
                                         for i, name in enumerate(order)))
    batch_sizes = []
    for i, (name, (status, body, headers)) in enumerate(zip(order, results, strict=True)):
        assert status == 200, body
        assert body["label"] == expected[name], (name, body["label"])
        assert headers["X-Request-ID"] == f"{name}-{i}"
        batch_sizes.append(body["batch_size"])
    # 24 requests at once against one model: while one batch runs the others queue and run together.
    assert max(batch_sizes) > 1, batch_sizes


async def test_bad_inputs_get_reasons_and_the_server_keeps_serving(servers: dict[str, Server],
                                                                   photos: dict[str, bytes]) -> None:
    from PIL import Image
    url = servers["opencv-dnn"].url
    png = io.BytesIO()
    Image.new("L", (9000, 5000)).save(png, "PNG")  # 45 Mpx, a few KB compressed: a decompression bomb
    cases = {
        "empty": (b"", 400, "empty"),
        "text": (b"hello, I am not an image", 415, "not an image"),
        "truncated JPEG": (photos["coffee"][: len(photos["coffee"]) // 3], 400, "truncated"),
        "bomb": (png.getvalue(), 413, "pixels"),
        "PDF": (b"%PDF-1.4\n" + b"x" * 100, 415, "not an image"),
    }
    async with aiohttp.ClientSession() as s:
        for what, (body, status, reason) in cases.items():
            got, answer, headers = await post(s, url, body, **{"Content-Type": "application/octet-stream"})
            assert got == status, (what, answer)
            # The one error shape of every hop (RFC 9457 + code + request_id), plus the seed's "message".
            assert answer["message"] == "error" and reason in answer["detail"], (what, answer)
            assert problem.is_problem(answer) and answer["status"] == status, (what, answer)
            assert answer["request_id"] == headers["X-Request-ID"], (what, answer)
            assert "Traceback" not in answer["detail"]
        status, answer, _ = await post(s, url, photos["chelsea"])
        assert status == 200 and answer["label"] in CAT_CLASSES
        async with s.get(url + "/metrics") as r:
            text = await r.text()
        assert 'inference_requests_total{status="415"}' in text
        assert "inference_batch_size_bucket" in text and "inference_queue_seconds_bucket" in text


async def test_multipart_upload_and_the_probe_page(servers: dict[str, Server], photos: dict[str, bytes]) -> None:
    url = servers["onnxruntime"].url
    async with aiohttp.ClientSession() as s:
        form = aiohttp.FormData()
        form.add_field("file", photos["coffee"], filename="coffee.jpg", content_type="image/jpeg")
        async with s.post(url + "/photo", data=form) as r:
            assert r.status == 200
            assert (await r.json())["label"] in COFFEE_CLASSES
        async with s.get(url + "/", headers={"X-Request-ID": "bad id\u00e9"}) as r:
            assert r.status == 200 and re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])
        async with s.get(url + "/", headers={"Host": "probe.example"}) as r:
            text = await r.text()
        assert r.status == 200 and "requester: 127.0.0.1:" in text and "host: probe.example" in text
        assert "server: " in text


async def test_oversized_body_is_413_before_decoding(tmp_path: Path, model_cache: Path,
                                                      photos: dict[str, bytes]) -> None:
    server = start_server("onnxruntime", tmp_path, model_cache, "--max-body-mb", "0.05", "--max-batch", "1")
    try:
        async with aiohttp.ClientSession() as s:
            status, answer, _ = await post(s, server.url, b"\xff\xd8" + b"\0" * 200_000)
            assert status == 413 and "limit" in answer["detail"]
            status, answer, _ = await post(s, server.url, photos["chelsea"])
            assert status == 200 and answer["batch_size"] == 1
    finally:
        server.proc.stop()


async def test_a_full_queue_answers_503_with_retry_after(tmp_path: Path, model_cache: Path,
                                                         photos: dict[str, bytes]) -> None:
    server = start_server("opencv-dnn", tmp_path, model_cache, "--max-queue", "1", "--max-batch", "1")
    try:
        async with aiohttp.ClientSession() as s:
            results = await asyncio.gather(*(post(s, server.url, photos["astronaut"]) for _ in range(24)))
        statuses = [r[0] for r in results]
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
        busy = next(r for r in results if r[0] == 503)
        assert busy[2]["Retry-After"] == "1" and "busy" in busy[1]["detail"]
    finally:
        server.proc.stop()


def test_healthz_is_not_ready_before_warm_up(tmp_path: Path, model_cache: Path) -> None:
    # The server listens before the model loads; many warm-up runs keep it cold for a while.
    server = start_server("opencv-dnn", tmp_path, model_cache, "--warmup-runs", "60", wait_ready=False)
    try:
        seen = []
        import time
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and 200 not in seen:
            try:
                seen.append(server.health()[0])
            except OSError:
                pass  # not listening yet
            time.sleep(0.02)
        assert seen and seen[0] == 503, seen[:5]
        assert seen[-1] == 200
        status, body = server.health()
        assert status == 200 and body["status"] == "ok"
    finally:
        server.proc.stop()


@pytest.mark.parametrize("model,backend,file_hint", [
    ("inception-v3", "tensorflow", "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"),
    ("googlenet", "opencv-dnn", "tensorflow_inception_graph.pb"),
])
def test_seed_models_offline_fail_in_one_line_naming_the_file(tmp_path: Path, model: str, backend: str,
                                                              file_hint: str) -> None:
    env = {"KERAS_HOME": str(tmp_path / "keras"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for command in (["serve", "--port", "1"], ["classify", str(tmp_path / "x.jpg")]):
        r = subprocess.run([PY, "-m", "inference", *command, "--model", model, "--backend", backend, "--offline",
                            "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and file_hint in lines[0], r.stderr
        assert "efficientnet-lite0" in lines[0]


def test_wrong_backend_for_a_seed_model_names_the_right_one(tmp_path: Path) -> None:
    r = subprocess.run([PY, "-m", "inference", "classify", "x.jpg", "--model", "googlenet", "--backend",
                        "tensorflow"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --model googlenet runs on --backend opencv-dnn or onnxruntime, not tensorflow"


def test_port_taken_is_one_line(tmp_path: Path, servers: dict[str, Server]) -> None:
    port = servers["opencv-dnn"].url.rsplit(":", 1)[1]
    r = subprocess.run([PY, "-m", "inference", "serve", "--port", port, "--cache-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"error: port {port} on 127.0.0.1 is already in use" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_classify_local_mode(tmp_path: Path, model_cache: Path, photos: dict[str, bytes], backend: str) -> None:
    (tmp_path / "chelsea.jpg").write_bytes(photos["chelsea"])
    (tmp_path / "coffee.jpg").write_bytes(photos["coffee"])
    (tmp_path / "broken.jpg").write_bytes(b"not a picture")
    r = subprocess.run([PY, "-m", "inference", "classify", str(tmp_path / "chelsea.jpg"), str(tmp_path / "coffee.jpg"),
                        str(tmp_path / "broken.jpg"), "--backend", backend, "--cache-dir", str(model_cache),
                        "--top", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout.splitlines()
    assert len(out) == 2, r.stdout + r.stderr
    assert out[0].split(": ", 1)[1].split()[0] in CAT_CLASSES
    assert out[1].split(": ", 1)[1].split()[0] in COFFEE_CLASSES
    assert "infer " in out[0] and "decode " in out[0]
    assert "broken.jpg: not an image in a supported format" in r.stderr
    assert r.returncode == 1  # one file failed
