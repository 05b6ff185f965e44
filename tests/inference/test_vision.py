"""Detection and transformation end to end: a real server with the pinned
TFLite files (fetched by `make weights`), real photos from scikit-image, the
local modes as real processes, and the one-line errors for missing files."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from PIL import Image

from httpcontract import problem
from httpcontract.timing import parse as parse_server_timing
from inference.weights import FILES, WeightsSettings, locate
from tests.harness import PY, ROOT

from .conftest import Server, start_server, vision_weights_missing

# Measured by hand on skimage.data.chelsea() (451 x 300) with a 50 px grid:
# the cat's fur runs from x ~15 to its right ear at x ~385, top to bottom of the frame.
CHELSEA_CAT = (15.0, 0.0, 385.0, 300.0)
# skimage.data.astronaut() (512 x 512): her face, forehead to chin.
ASTRONAUT_FACE = (175.0, 70.0, 275.0, 180.0)
# astronaut regions: inside the person (face, suit) and background (wall above the shuttle, the flag).
PERSON_REGIONS = ((190, 90, 260, 170), (100, 300, 300, 450))
BACKGROUND_REGIONS = ((300, 0, 350, 50), (0, 0, 50, 150))
TIMING = ("decode", "preprocess", "queue", "infer", "postprocess", "app")


def box_iou(a: tuple[float, ...] | list[float], b: tuple[float, ...] | list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def timing(header: str) -> dict[str, float]:
    return parse_server_timing([header])


def grey_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (128, 128, 128)).save(buf, "JPEG")
    return buf.getvalue()


pytestmark = pytest.mark.skipif(bool(vision_weights_missing()), reason=vision_weights_missing() or "-")


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    server = start_server("onnxruntime", tmp_path_factory.mktemp("vision-logs"), model_cache,
                          "--kinds", "classify,detect,transform", "--max-batch", "4")
    try:
        yield server
    finally:
        server.proc.stop()


async def test_the_cat_in_chelsea_is_found_where_it_is(vision: Server, photos: dict[str, bytes]) -> None:
    async with aiohttp.ClientSession() as s, s.post(vision.url + "/detect", data=photos["chelsea"],
                                                    headers={"X-Request-ID": "cat-1"}) as r:
        assert r.status == 200, await r.text()
        body = await r.json()
        assert r.headers["X-Request-ID"] == "cat-1"
        assert set(TIMING) <= set(timing(r.headers["Server-Timing"]))
    assert body["model"] == "ssd-mobilenet-v2" and body["image"] == {"width": 451, "height": 300}
    cats = [d for d in body["detections"] if d["label"] == "Cat"]
    assert cats, body
    assert box_iou(cats[0]["box"], CHELSEA_CAT) >= 0.5, (cats[0], CHELSEA_CAT)
    assert cats[0]["score"] >= 0.5 and cats[0]["class_id"] == 8
    assert all(d["score"] >= 0.5 for d in body["detections"])  # the default threshold


async def test_a_flat_grey_image_has_nothing_above_threshold(vision: Server) -> None:
    async with aiohttp.ClientSession() as s, s.post(vision.url + "/detect", data=grey_jpeg()) as r:
        assert r.status == 200
        assert (await r.json())["detections"] == []


async def test_min_score_and_max_shape_the_answer(vision: Server, photos: dict[str, bytes]) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(vision.url + "/detect?min_score=0.05&max=50", data=photos["astronaut"]) as r:
            low = (await r.json())["detections"]
        async with s.post(vision.url + "/detect?min_score=0.05&max=2", data=photos["astronaut"]) as r:
            two = (await r.json())["detections"]
    assert len(low) > 2 and min(d["score"] for d in low) >= 0.05
    assert [d["score"] for d in low] == sorted((d["score"] for d in low), reverse=True)
    assert two == low[:2]
    assert "Person" in {d["label"] for d in low}


@pytest.mark.parametrize("query, says", [("min_score=2", "?min_score= must be from 0 to 1"),
                                         ("min_score=abc", "?min_score= must be a number"),
                                         ("max=0", "?max= must be from 1 to 1000"),
                                         ("max=2.5", "?max= must be a whole number")])
async def test_bad_detect_query_is_a_400_problem(vision: Server, photos: dict[str, bytes], query: str,
                                                 says: str) -> None:
    async with aiohttp.ClientSession() as s, s.post(f"{vision.url}/detect?{query}", data=photos["chelsea"]) as r:
        assert r.status == 400
        body = await r.json(content_type=None)
    assert problem.is_problem(body) and body["code"] == "bad_query" and says in body["detail"], body


@pytest.mark.parametrize("path", ["/detect", "/transform"])
async def test_bad_images_get_the_photo_errors(vision: Server, path: str) -> None:
    async with aiohttp.ClientSession() as s:
        for data, status, code in ((b"", 400, "bad_image"), (b"hello, not a picture", 415, "unsupported_media_type"),
                                   (grey_jpeg()[:300], 400, "bad_image")):
            async with s.post(vision.url + path, data=data) as r:
                body = await r.json(content_type=None)
                assert r.status == status and body["code"] == code, body
                assert body["message"] == "error" and "request_id" in body
        # and the server still answers
        async with s.post(vision.url + path, data=grey_jpeg()) as r:
            assert r.status == 200


async def test_astronaut_background_is_cut_out_and_the_person_kept(vision: Server, photos: dict[str, bytes]) -> None:
    async with aiohttp.ClientSession() as s, s.post(vision.url + "/transform?mode=cutout",
                                                    data=photos["astronaut"]) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"] == "image/png"
        phases = timing(r.headers["Server-Timing"])
        data = await r.read()
    assert {*TIMING, "encode"} <= set(phases)
    covered = float(r.headers["X-Mask-Coverage"])
    assert 0.3 < covered < 0.8, covered
    img = Image.open(io.BytesIO(data))
    assert img.mode == "RGBA" and img.size == (512, 512)
    alpha = np.asarray(img)[..., 3].astype(float) / 255
    for x0, y0, x1, y1 in PERSON_REGIONS:
        assert alpha[y0:y1, x0:x1].mean() > 0.8, ("person", (x0, y0, x1, y1))
    for x0, y0, x1, y1 in BACKGROUND_REGIONS:
        assert alpha[y0:y1, x0:x1].mean() < 0.2, ("background", (x0, y0, x1, y1))


async def test_replace_and_blur_answer_an_image_of_the_same_size(vision: Server, photos: dict[str, bytes]) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(vision.url + "/transform?mode=replace&color=0000ff", data=photos["astronaut"]) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg"
            replaced = np.asarray(Image.open(io.BytesIO(await r.read())).convert("RGB")).astype(int)
        async with s.post(vision.url + "/transform", data=photos["chelsea"], headers={"Accept": "image/png"}) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/png"
            blurred = Image.open(io.BytesIO(await r.read()))
    assert replaced.shape == (512, 512, 3)
    x0, y0, x1, y1 = BACKGROUND_REGIONS[0]
    assert np.abs(replaced[y0:y1, x0:x1] - [0, 0, 255]).mean() < 20  # the wall is now blue
    x0, y0, x1, y1 = PERSON_REGIONS[0]
    assert np.abs(replaced[y0:y1, x0:x1] - [0, 0, 255]).mean() > 100  # her face is not
    assert blurred.size == (451, 300)


@pytest.mark.parametrize("query, accept, status, code", [
    ("mode=sepia", None, 400, "bad_query"), ("mode=replace&color=blue", None, 400, "bad_query"),
    ("mode=cutout", "image/jpeg", 406, "not_acceptable"), ("mode=blur", "application/json", 406, "not_acceptable")])
async def test_bad_transform_requests_are_problems(vision: Server, photos: dict[str, bytes], query: str,
                                                   accept: str | None, status: int, code: str) -> None:
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as s, s.post(f"{vision.url}/transform?{query}", data=photos["astronaut"],
                                                    headers=headers) as r:
        assert r.status == status
        body = await r.json(content_type=None)
    assert problem.is_problem(body) and body["code"] == code, body


async def test_all_kinds_on_one_server(vision: Server, photos: dict[str, bytes]) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(vision.url + "/healthz") as r:
            health = await r.json()
        async with s.post(vision.url + "/photo", data=photos["chelsea"]) as r:
            assert r.status == 200 and (await r.json())["message"] == "success"
        async with s.get(vision.url + "/metrics") as r:
            metrics = await r.text()
    assert health["models"] == {"classify": "efficientnet-lite0", "detect": "ssd-mobilenet-v2",
                                "transform": "selfie-segmentation"}
    assert 'inference_kind_requests_total{kind="detect",status="200"}' in metrics


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "inference", *args], cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_local_detect_finds_the_face_in_astronaut(tmp_path: Path, photos: dict[str, bytes]) -> None:
    image = tmp_path / "astronaut.jpg"
    image.write_bytes(photos["astronaut"])
    done = run_cli("detect", str(image), "--detector", "blazeface", "--json", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    faces = answer["detections"]
    assert len(faces) == 1 and faces[0]["label"] == "face", faces
    assert box_iou(faces[0]["box"], ASTRONAUT_FACE) >= 0.5, faces
    drawn = Image.open(answer["out"])
    assert drawn.size == (512, 512)


def test_local_transform_writes_the_image(tmp_path: Path, photos: dict[str, bytes]) -> None:
    image = tmp_path / "astronaut.jpg"
    image.write_bytes(photos["astronaut"])
    done = run_cli("transform", str(image), str(tmp_path / "missing.jpg"), "--mode", "cutout",
                   "--out", str(tmp_path))
    assert done.returncode == 1  # one file could not be read
    assert "missing.jpg: cannot read" in done.stderr
    assert "person covers" in done.stdout
    assert Image.open(tmp_path / "astronaut.cutout.png").mode == "RGBA"


def test_missing_weights_are_one_line_naming_the_fix(tmp_path: Path, photos: dict[str, bytes]) -> None:
    image = tmp_path / "cat.jpg"
    image.write_bytes(photos["chelsea"])
    done = run_cli("detect", str(image), "--weights-dir", str(tmp_path / "empty"))
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "ssd-mobilenet-v2.tflite is missing" in lines[0] and "make weights" in lines[0]
    assert "Traceback" not in done.stderr


def test_a_damaged_weights_file_is_refused(tmp_path: Path) -> None:
    from inference.errors import ModelUnavailable
    real = WeightsSettings().path()
    damaged = tmp_path / "face_detection_short_range.tflite"
    damaged.write_bytes((real / damaged.name).read_bytes()[:-1] + b"x")
    with pytest.raises(ModelUnavailable, match="damaged or not the pinned file.*make weights"):
        locate(damaged.name, tmp_path)
    assert locate(damaged.name, real) == real / damaged.name
    assert set(FILES) == {p.name for p in real.iterdir() if p.name in FILES}


def test_serve_refuses_to_start_without_the_files(tmp_path: Path) -> None:
    done = subprocess.run([PY, "-m", "inference", "serve", "--port", "1", "--kinds", "transform",
                           "--weights-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "selfie_segmentation.tflite is missing; run `make weights`" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------ GET /stream?model=

def ws_url(server: Server, query: str) -> str:
    return server.url.replace("http://", "ws://") + "/stream" + query


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float = 60) -> aiohttp.WSMessage:
    async with asyncio.timeout(timeout):
        return await ws.receive()


async def test_stream_carries_detections(vision: Server, photos: dict[str, bytes]) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(vision, "?model=ssd-mobilenet-v2&drop=none")) as ws:
        await ws.send_bytes(photos["chelsea"])
        await ws.send_bytes(grey_jpeg())
        first, second = json.loads((await receive(ws)).data), json.loads((await receive(ws)).data)
    assert first["seq"] == 0 and first["model"] == "ssd-mobilenet-v2"
    cats = [d for d in first["detections"] if d["label"] == "Cat"]
    assert cats and box_iou(cats[0]["box"], CHELSEA_CAT) >= 0.5
    assert set(TIMING) <= set(first["timing"])
    assert second["seq"] == 1 and second["detections"] == []


async def test_stream_transformation_is_json_then_the_image(vision: Server, photos: dict[str, bytes]) -> None:
    query = "?model=selfie-segmentation&mode=cutout&drop=none"
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(vision, query)) as ws:
        await ws.send_bytes(photos["astronaut"])
        await ws.send_bytes(b"not an image")
        await ws.send_bytes(photos["chelsea"])
        got = [await receive(ws) for _ in range(4)]
    head0, image0, bad, head2 = (got[0], got[1], got[2], got[3])
    meta = json.loads(head0.data)
    assert meta["seq"] == 0 and meta["format"] == "png" and 0.3 < meta["mask_coverage"] < 0.8
    assert {*TIMING, "encode"} <= set(meta["timing"])
    assert image0.type == aiohttp.WSMsgType.BINARY and len(image0.data) == meta["bytes"]
    img = Image.open(io.BytesIO(image0.data))
    assert img.mode == "RGBA" and img.size == (512, 512)
    assert json.loads(bad.data) == {"seq": 1, "error": "not an image in a supported format (JPEG, PNG, WebP, BMP, "
                                                      "GIF, TIFF)"}
    assert json.loads(head2.data)["seq"] == 2  # an error has no image after it


@pytest.mark.parametrize("query, status", [("?model=yolo", 404), ("?model=ssd-mobilenet-v2&max=0", 400),
                                           ("?model=selfie-segmentation&mode=cutout&format=jpeg", 400)])
async def test_stream_refuses_unknown_models_and_bad_parameters_before_the_upgrade(vision: Server, query: str,
                                                                                   status: int) -> None:
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(ws_url(vision, query))
    assert info.value.status == status


async def test_stream_without_model_still_classifies(vision: Server, photos: dict[str, bytes]) -> None:
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(vision, "")) as ws:
        await ws.send_bytes(photos["chelsea"])
        answer = json.loads((await receive(ws)).data)
    assert answer["model"] == "efficientnet-lite0" and "label" in answer


async def test_a_large_jpeg_is_reported_and_boxed_in_its_own_pixels(vision: Server) -> None:
    """Large JPEGs decode at a reduced DCT scale; the answers still speak of
    the image sent (this was 500x375 on /photo for a 2000x1500 photo)."""
    import skimage.data
    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).resize((1804, 1200)).save(buf, "JPEG", quality=90)
    async with aiohttp.ClientSession() as s:
        async with s.post(vision.url + "/photo", data=buf.getvalue()) as r:
            assert (await r.json())["image"] == {"width": 1804, "height": 1200}
        async with s.post(vision.url + "/detect", data=buf.getvalue()) as r:
            body = await r.json()
    assert body["image"] == {"width": 1804, "height": 1200}
    cat = next(d for d in body["detections"] if d["label"] == "Cat")
    assert box_iou(cat["box"], [v * 4 for v in CHELSEA_CAT]) >= 0.5, cat


def test_weights_fetch_is_a_no_op_once_the_files_are_there(tmp_path: Path) -> None:
    real = WeightsSettings().path()
    ok = subprocess.run([PY, "-m", "inference.weights", "fetch", "--weights-dir", str(real)], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "already complete" in ok.stdout, ok.stderr  # no download: nothing missing
    check = subprocess.run([PY, "-m", "inference.weights", "check", "--weights-dir", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode != 0
    assert check.stderr.count("\n") == 1 and "missing or damaged" in check.stderr and "make weights" in check.stderr
