"""The Open Inference Protocol (v2) on the real inference server: NVIDIA's own
client (`tritonclient[http]`) directly and through the edge over TLS with a
client key, raw JSON requests for the JSON tensor form, and every OIP error."""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from inference.config import ServerConfig
from inference.imaging import prepare
from inference.models import ModelPlan, Preprocess
from inference.server import make_app
from tests.harness import Pki, System, make_pki, wait_for

from .conftest import Server, start_server, vision_weights_missing

http = pytest.importorskip("tritonclient.http")
utils = pytest.importorskip("tritonclient.utils")

MODEL = "efficientnet-lite0"
CAT_CLASSES = {"tabby", "tiger_cat", "Egyptian_cat", "Persian_cat", "Siamese_cat", "lynx"}
TIMING = ("decode", "preprocess", "queue", "infer", "postprocess", "app")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    s = start_server("onnxruntime", tmp_path_factory.mktemp("oip-logs"), model_cache, "--max-queue", "16",
                     "--max-body-mb", "1")
    try:
        yield s
    finally:
        s.proc.stop()


def client(url: str) -> Any:
    return http.InferenceServerClient(url.removeprefix("http://"))


def image_input(*images: bytes) -> Any:
    i = http.InferInput("image", [len(images)], "BYTES")
    i.set_data_from_numpy(np.array(images, dtype=np.object_))
    return i


def labels(result: Any) -> list[list[str]]:
    """The classification strings "score:index:label" -> labels, per image."""
    return [[s.decode().split(":", 2)[2] for s in row] for row in result.as_numpy("scores")]


def check_everything_through(c: Any, photos: dict[str, bytes]) -> None:
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL)
    meta = c.get_server_metadata()
    assert {"classification", "binary_tensor_data"} <= set(meta["extensions"])
    assert c.get_model_repository_index() == [{"name": MODEL, "version": "1", "state": "READY"}]
    md = c.get_model_metadata(MODEL)
    assert md["name"] == MODEL and md["versions"] == ["1"] and md["platform"] == "onnxruntime"
    assert {i["name"]: (i["datatype"], i["shape"]) for i in md["inputs"]} == {
        "image": ("BYTES", [-1]), "input": ("FP32", [-1, 224, 224, 3])}
    assert md["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 1000]}]
    # A batch of three encoded photos, binary in and out (the client's default).
    batch = [photos["chelsea"], photos["coffee"], photos["astronaut"]]
    scores = c.infer(MODEL, [image_input(*batch)]).as_numpy("scores")
    assert scores.shape == (3, 1000) and scores.dtype == np.float32
    assert np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)
    top = c.infer(MODEL, [image_input(*batch)], outputs=[http.InferRequestedOutput("scores", class_count=3)])
    names = labels(top)
    assert len(names) == 3 and all(len(row) == 3 for row in names)
    assert names[0][0] in CAT_CLASSES
    first = top.as_numpy("scores")[0][0].decode().split(":")
    assert int(first[1]) == int(np.argmax(scores[0])) and abs(float(first[0]) - scores[0].max()) < 1e-5


def test_tritonclient_direct(server: Server, photos: dict[str, bytes]) -> None:
    c = client(server.url)
    check_everything_through(c, photos)
    # The FP32 input takes the tensor in the layout the metadata states, and
    # gives the same scores as the encoded image preprocessed by the server.
    md = c.get_model_metadata(MODEL)
    tensor = next(i for i in md["inputs"] if i["name"] == "input")
    p = tensor["parameters"]
    assert p["layout"] == "NHWC" and p["center_crop"] == tensor["shape"][1] == tensor["shape"][2]
    spec = Preprocess(size=p["center_crop"], resize=p["resize_shorter_side"], mean=p["mean"], scale=p["scale"],
                      bgr=p["channels"] == "BGR")
    x = prepare(photos["chelsea"], spec).array[None]
    t = http.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    by_tensor = c.infer(MODEL, [t]).as_numpy("scores")
    by_image = c.infer(MODEL, [image_input(photos["chelsea"])]).as_numpy("scores")
    assert np.allclose(by_tensor, by_image, atol=1e-4)
    # Versioned paths and the FP32 output in JSON.
    r = c.infer(MODEL, [image_input(photos["coffee"])], model_version="1",
                outputs=[http.InferRequestedOutput("scores", binary_data=False)])
    assert r.get_response()["outputs"][0]["datatype"] == "FP32" and r.as_numpy("scores").shape == (1, 1000)


async def raw(url: str, path: str, body: bytes | dict[str, Any] | None = None, method: str = "POST",
              **headers: str) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    async with aiohttp.ClientSession() as s, s.request(method, url + path, data=data, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


INFER = f"/v2/models/{MODEL}/infer"


async def test_json_tensor_form_and_server_timing(server: Server, photos: dict[str, bytes]) -> None:
    req = {"id": "my-7", "inputs": [{"name": "image", "shape": [2, 1], "datatype": "BYTES",
                                    "data": [base64.b64encode(photos["chelsea"]).decode(),
                                             {"b64": base64.b64encode(photos["coffee"]).decode()}]}],
           "outputs": [{"name": "scores", "parameters": {"classification": 2}}]}
    status, headers, body = await raw(server.url, INFER, req, **{"X-Request-ID": "oip-json-1"})
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json") and "Inference-Header-Content-Length" not in headers
    doc = json.loads(body)
    assert doc["id"] == "my-7" and doc["model_name"] == MODEL and doc["model_version"] == "1"
    out = doc["outputs"][0]
    assert out["name"] == "scores" and out["datatype"] == "BYTES" and out["shape"] == [2, 2]
    assert out["data"][0].split(":")[2] in CAT_CLASSES and len(out["data"]) == 4
    assert headers["X-Request-ID"] == "oip-json-1"
    timing = dict(e.split(";dur=") for e in headers["Server-Timing"].split(", "))
    assert set(timing) == set(TIMING)
    ms = {k: float(v) for k, v in timing.items()}
    assert ms["app"] >= ms["decode"] + ms["preprocess"] + ms["queue"] + ms["infer"] - 0.01

    # FP32 in JSON, nested, answered with every score in JSON.
    x = np.zeros((1, 224, 224, 3), np.float32)
    req = {"inputs": [{"name": "input", "shape": [1, 224, 224, 3], "datatype": "FP32", "data": x.tolist()}]}
    status, headers, body = await raw(server.url, INFER, req)
    assert status == 200, body
    out = json.loads(body)["outputs"][0]
    assert out["datatype"] == "FP32" and out["shape"] == [1, 1000] and len(out["data"]) == 1000

    # Binary out on request, mixed with a JSON input.
    req = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                       "data": [base64.b64encode(photos["chelsea"]).decode()]}],
           "parameters": {"binary_data_output": True}}
    status, headers, body = await raw(server.url, INFER, req)
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 4000 == len(body) - n
    assert abs(np.frombuffer(body[n:], "<f4").sum() - 1) < 1e-3


def binary_request(doc: dict[str, Any], blob: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(doc).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head))}


async def expect_error(url: str, path: str, status: int, contains: str, body: Any = None, method: str = "POST",
                       **headers: str) -> dict[str, str]:
    got, h, data = await raw(url, path, body, method, **headers)
    assert got == status, (path, data)
    doc = json.loads(data)
    assert list(doc) == ["error"] and contains in doc["error"], doc
    assert h["Content-Type"].startswith("application/json")
    return h


def image_json(data: list[str], shape: list[int] | None = None, datatype: str = "BYTES") -> dict[str, Any]:
    return {"inputs": [{"name": "image", "shape": shape or [len(data)], "datatype": datatype, "data": data}]}


async def test_every_oip_error(server: Server, photos: dict[str, bytes]) -> None:
    u = server.url
    cat = base64.b64encode(photos["chelsea"]).decode()
    await expect_error(u, "/v2/models/resnet50/infer", 404, "unknown model 'resnet50'", image_json([cat]))
    await expect_error(u, "/v2/models/resnet50", 404, "unknown model", method="GET")
    await expect_error(u, "/v2/models/resnet50/ready", 404, "unknown model", method="GET")
    await expect_error(u, f"/v2/models/{MODEL}/versions/2/infer", 404, "unknown version '2'", image_json([cat]))
    await expect_error(u, "/v2/models", 404, "Not Found", method="GET")
    await expect_error(u, INFER, 405, "Method Not Allowed", method="GET")
    # Not an image, in JSON and binary.
    await expect_error(u, INFER, 400, "element 1: not an image",
                       image_json([cat, base64.b64encode(b"hello").decode()]))
    body, h = binary_request({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                          "parameters": {"binary_data_size": 9}}]}, struct.pack("<I", 5) + b"hello")
    await expect_error(u, INFER, 400, "element 0: not an image", body, **h)
    await expect_error(u, INFER, 400, "element 0: corrupt or truncated", image_json([cat[:4000]]))
    await expect_error(u, INFER, 400, "not base64", image_json(["not base64!"]))
    # Wrong datatype, shape, names, counts.
    await expect_error(u, INFER, 400, "must have datatype BYTES", image_json([cat], datatype="FP32"))
    await expect_error(u, INFER, 400, "shape [N] or [N,1]", image_json([cat], shape=[1, 2]))
    await expect_error(u, INFER, 400, "shape says 2 elements", image_json([cat], shape=[2]))
    await expect_error(u, INFER, 400, "shape [N,224,224,3]",
                       {"inputs": [{"name": "input", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [0]}]})
    await expect_error(u, INFER, 400, "needs 150528 numbers",
                       {"inputs": [{"name": "input", "shape": [1, 224, 224, 3], "datatype": "FP32", "data": [0]}]})
    await expect_error(u, INFER, 400, "must have datatype FP32",
                       {"inputs": [{"name": "input", "shape": [1, 224, 224, 3], "datatype": "UINT8", "data": [0]}]})
    body, h = binary_request({"inputs": [{"name": "input", "shape": [1, 224, 224, 3], "datatype": "FP32",
                                          "parameters": {"binary_data_size": 8}}]}, b"\0" * 8)
    await expect_error(u, INFER, 400, "8 bytes of FP32 data", body, **h)
    nan = np.full((1, 224, 224, 3), np.nan, "<f4").tobytes()
    body, h = binary_request({"inputs": [{"name": "input", "shape": [1, 224, 224, 3], "datatype": "FP32",
                                          "parameters": {"binary_data_size": len(nan)}}]}, nan)
    await expect_error(u, INFER, 400, "NaN", body, **h)
    await expect_error(u, INFER, 400, "unknown input 'INPUT__0'",
                       {"inputs": [{"name": "INPUT__0", "shape": [1], "datatype": "BYTES", "data": [cat]}]})
    both = image_json([cat])
    both["inputs"].append({"name": "input", "shape": [1, 224, 224, 3], "datatype": "FP32", "data": [0.0] * 150528})
    await expect_error(u, INFER, 400, "not both", both)
    await expect_error(u, INFER, 400, "unknown output 'logits'", {**image_json([cat]), "outputs": [{"name": "logits"}]})
    await expect_error(u, INFER, 400, "'inputs' must be a non-empty list", {"inputs": []})
    await expect_error(u, INFER, 400, "not JSON", b"\xff\xd8 a jpeg posted as is")
    await expect_error(u, INFER, 400, "Inference-Header-Content-Length is 999", b"{}",
                       **{"Inference-Header-Content-Length": "999"})
    body, h = binary_request({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                          "parameters": {"binary_data_size": 100}}]}, b"\0" * 10)
    await expect_error(u, INFER, 400, "runs past the body", body, **h)
    await expect_error(u, INFER, 400, "exceeds this server's queue of 16", image_json([cat] * 17))
    await expect_error(u, INFER, 413, "Too Large", b"{" + b" " * (1 << 20) + b"}")
    # The server is still fine after all that.
    status, _, body = await raw(u, INFER, image_json([cat]))
    assert status == 200, body


async def test_busy_is_503_with_retry_after(tmp_path: Path, model_cache: Path) -> None:
    s = start_server("onnxruntime", tmp_path, model_cache, "--max-queue", "2", "--max-batch", "1")
    try:
        x = np.zeros((2, 224, 224, 3), "<f4").tobytes()
        body, h = binary_request({"inputs": [{"name": "input", "shape": [2, 224, 224, 3], "datatype": "FP32",
                                              "parameters": {"binary_data_size": len(x)}}]}, x)
        seen: dict[int, dict[str, str]] = {}

        async def burst() -> bool:
            async with aiohttp.ClientSession() as session:
                async def one() -> None:
                    async with session.post(s.url + INFER, data=body, headers=h) as r:
                        doc = await r.json()
                        seen.setdefault(r.status, dict(r.headers) | {"error": doc.get("error", "")})
                import asyncio
                await asyncio.gather(*(one() for _ in range(8)))
            return 503 in seen and 200 in seen

        await wait_for(burst, 60, lambda: f"a 503 among concurrent requests, saw {sorted(seen)}")
        assert seen[503]["Retry-After"] == "1" and "server busy" in seen[503]["error"]
        assert set(seen) <= {200, 503}
    finally:
        s.proc.stop()


@pytest.fixture
async def unloaded() -> AsyncIterator[TestServer]:
    """A real server on loopback whose model never finished loading."""
    plan = ModelPlan(MODEL, "onnxruntime", Preprocess(224, 256, 127.0, 1 / 128), Path("/nonexistent"))
    ts = TestServer(make_app(plan, ServerConfig()))
    await ts.start_server()
    try:
        yield ts
    finally:
        await ts.close()


async def test_ready_only_when_warm(unloaded: TestServer) -> None:
    u = str(unloaded.make_url("")).rstrip("/")
    status, _, _ = await raw(u, "/v2/health/live", method="GET")
    assert status == 200
    h = await expect_error(u, "/v2/health/ready", 503, "model is loading", method="GET")
    assert h["Retry-After"] == "1"
    await expect_error(u, f"/v2/models/{MODEL}/ready", 503, "is loading", method="GET")
    await expect_error(u, INFER, 503, "is loading", image_json(["AAAA"]))
    status, _, body = await raw(u, "/v2/repository/index", b"")
    assert status == 200 and json.loads(body) == [{"name": MODEL, "version": "1", "state": "LOADING"}]
    from inference.state import STATE
    unloaded.app[STATE].load_error = "weights file missing"
    status, _, body = await raw(u, "/v2/repository/index", b"")
    assert json.loads(body)[0] == {"name": MODEL, "version": "1", "state": "UNAVAILABLE",
                                   "reason": "weights file missing"}
    await expect_error(u, "/v2/health/ready", 503, "failed to load: weights file missing", method="GET")


# ------------------------------------------------------------ through the edge

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def test_tritonclient_through_the_edge_over_tls(server: Server, pki: Pki, tmp_path: Path,
                                                      photos: dict[str, bytes]) -> None:
    import gevent.ssl

    s = System(pki, tmp_path)
    try:
        _, edge = await s.edge()
        s.agent("oip-worker", edge, server.url, "--health-path", "/v2/health/ready")
        await s.wait_available(edge, ["oip-worker"])
        ca = str(pki.ca)
        auth = {"Authorization": f"Bearer {pki.client_key}"}
        c = http.InferenceServerClient(edge.removeprefix("https://"), ssl=True,
                                       ssl_context_factory=lambda **_: gevent.ssl.create_default_context(cafile=ca))
        # Every call carries the client key; without it the edge refuses.
        with pytest.raises(utils.InferenceServerException):
            c.get_model_metadata(MODEL)
        for name in ("is_server_live", "is_server_ready", "get_server_metadata", "get_model_repository_index"):
            setattr(c, name, _with_headers(getattr(c, name), auth))
        for name in ("is_model_ready", "get_model_metadata", "infer"):
            setattr(c, name, _with_headers(getattr(c, name), auth))
        check_everything_through(c, photos)
        # The hops of the timing contract arrive with the OIP answer.
        t0 = time.perf_counter()
        r = c.infer(MODEL, [image_input(photos["chelsea"])],
                    outputs=[http.InferRequestedOutput("scores", class_count=1)])
        assert labels(r)[0][0] in CAT_CLASSES and time.perf_counter() - t0 < 30
        body, h = binary_request({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                              "parameters": {"binary_data_size": 4 + len(photos["coffee"])}}]},
                                 struct.pack("<I", len(photos["coffee"])) + photos["coffee"])
        async with s.http().post(edge + INFER, data=body, headers=h | auth) as resp:
            assert resp.status == 200
            hops = {e.split(";")[0] for e in ", ".join(resp.headers.getall("Server-Timing")).split(", ")}
            assert {*TIMING, "upstream", "agent", "tunnel", "edge"} <= hops
            await resp.read()
        # An OIP error crosses the edge as the server wrote it.
        async with s.http().post(edge + "/v2/models/nope/infer", json=image_json(["AAAA"]), headers=auth) as resp:
            assert resp.status == 404 and list(await resp.json()) == ["error"]
    finally:
        await s.close()


def _with_headers(fn: Any, headers: dict[str, str]) -> Any:
    def call(*args: Any, **kw: Any) -> Any:
        return fn(*args, headers=dict(headers), **kw)  # the client adds its own to the dict it gets
    return call


# ------------------------------------------------- the detector and the transformer

DETECTOR, TRANSFORMER = "ssd-mobilenet-v2", "selfie-segmentation"
vision_only = pytest.mark.skipif(bool(vision_weights_missing()), reason=vision_weights_missing() or "-")


@pytest.fixture(scope="module")
def kinds_server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Server]:
    if vision_weights_missing():
        pytest.skip(vision_weights_missing())
    s = start_server("onnxruntime", tmp_path_factory.mktemp("oip-kinds-logs"), model_cache,
                     "--kinds", "classify,detect,transform", "--max-queue", "8")
    try:
        yield s
    finally:
        s.proc.stop()


@vision_only
def test_every_kind_is_in_the_index_with_truthful_metadata(kinds_server: Server) -> None:
    c = client(kinds_server.url)
    assert c.get_model_repository_index() == [{"name": n, "version": "1", "state": "READY"}
                                              for n in (MODEL, DETECTOR, TRANSFORMER)]
    assert all(c.is_model_ready(n) for n in (MODEL, DETECTOR, TRANSFORMER)) and c.is_server_ready()
    det = c.get_model_metadata(DETECTOR)
    assert det["platform"] == "tflite" and det["versions"] == ["1"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in det["inputs"]] == [("image", "BYTES", [-1])]
    assert [(o["name"], o["datatype"], o["shape"]) for o in det["outputs"]] == [
        ("boxes", "FP32", [-1, -1, 4]), ("scores", "FP32", [-1, -1]), ("classes", "INT32", [-1, -1]),
        ("labels", "BYTES", [-1, -1]), ("count", "INT32", [-1])]
    assert "Cat" in det["outputs"][3]["parameters"]["classes"]
    seg = c.get_model_metadata(TRANSFORMER)
    assert [(i["name"], i["datatype"]) for i in seg["inputs"]] == [("image", "BYTES")]
    assert [(o["name"], o["datatype"], o["shape"]) for o in seg["outputs"]] == [
        ("transformed", "BYTES", [-1]), ("mask_coverage", "FP32", [-1])]
    assert c.get_model_metadata(MODEL)["outputs"][0]["name"] == "scores"  # the classifier is unchanged


@vision_only
async def test_tritonclient_detects_the_cat_where_post_detect_does(kinds_server: Server,
                                                                   photos: dict[str, bytes]) -> None:
    from .test_vision import CHELSEA_CAT, box_iou, grey_jpeg
    c = client(kinds_server.url)
    r = c.infer(DETECTOR, [image_input(photos["chelsea"], grey_jpeg())])
    count, boxes, scores = r.as_numpy("count"), r.as_numpy("boxes"), r.as_numpy("scores")
    classes, names = r.as_numpy("classes"), r.as_numpy("labels")
    k = int(count.max())
    assert count.dtype == np.int32 and list(count) == [k, 0] and k >= 1
    assert boxes.shape == (2, k, 4) and boxes.dtype == np.float32 and scores.shape == classes.shape == (2, k)
    assert names[0][0] == b"Cat" and classes[0][0] == 8 and scores[0][0] >= 0.5
    assert box_iou(boxes[0][0].tolist(), CHELSEA_CAT) >= 0.5
    assert (classes[1] == -1).all() and (scores[1] == 0).all() and (names[1] == b"").all()  # the padding
    none = c.infer(DETECTOR, [image_input(grey_jpeg())])
    assert none.as_numpy("boxes").shape == (1, 0, 4) and list(none.as_numpy("count")) == [0]
    async with aiohttp.ClientSession() as s, s.post(kinds_server.url + "/detect", data=photos["chelsea"]) as resp:
        same = (await resp.json())["detections"]
    assert [d["label"] for d in same] == [n.decode() for n in names[0]]
    assert np.allclose([d["box"] for d in same], boxes[0], atol=0.05)
    # The request's parameters are /detect's query.
    low = c.infer(DETECTOR, [image_input(photos["astronaut"])], parameters={"min_score": 0.05, "max": 3})
    assert low.as_numpy("count")[0] == 3 and "Person" in {n.decode() for n in low.as_numpy("labels")[0]}
    # JSON in and out, with the Server-Timing phases.
    req = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                       "data": [base64.b64encode(photos["chelsea"]).decode()]}],
           "outputs": [{"name": "labels"}, {"name": "count"}]}
    status, headers, body = await raw(kinds_server.url, f"/v2/models/{DETECTOR}/infer", req)
    assert status == 200, body
    doc = json.loads(body)
    assert [o["name"] for o in doc["outputs"]] == ["labels", "count"]
    assert doc["outputs"][0]["data"][0] == "Cat" and doc["outputs"][1] == {
        "name": "count", "datatype": "INT32", "shape": [1], "data": [len(same)]}
    assert list(parse_timing(headers)) == list(TIMING)


def parse_timing(headers: dict[str, str]) -> dict[str, float]:
    return {k: float(v) for k, v in (e.split(";dur=") for e in headers["Server-Timing"].split(", "))}


@vision_only
async def test_tritonclient_transforms_an_image_to_an_image(kinds_server: Server, photos: dict[str, bytes]) -> None:
    import io

    from PIL import Image

    from .test_vision import BACKGROUND_REGIONS, PERSON_REGIONS
    c = client(kinds_server.url)
    r = c.infer(TRANSFORMER, [image_input(photos["astronaut"], photos["chelsea"])],
                parameters={"mode": "replace", "format": "png", "color": "0000ff"})
    out, cover = r.as_numpy("transformed"), r.as_numpy("mask_coverage")
    assert out.shape == (2,) and cover.shape == (2,) and cover.dtype == np.float32
    img = Image.open(io.BytesIO(out[0]))
    assert img.format == "PNG" and img.size == (512, 512)
    px = np.asarray(img.convert("RGB"), np.int32)
    for x0, y0, x1, y1 in BACKGROUND_REGIONS:
        assert np.abs(px[y0:y1, x0:x1].mean(axis=(0, 1)) - (0, 0, 255)).max() < 40
    for x0, y0, x1, y1 in PERSON_REGIONS:
        assert np.abs(px[y0:y1, x0:x1].mean(axis=(0, 1)) - (0, 0, 255)).max() > 60
    assert Image.open(io.BytesIO(out[1])).size == (451, 300) and 0.05 < cover[0] < 0.95
    # The cutout has alpha; JSON gives the image in base64; the phases include encode.
    req = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                       "data": [base64.b64encode(photos["astronaut"]).decode()]}],
           "parameters": {"mode": "cutout"}, "outputs": [{"name": "transformed"}]}
    status, headers, body = await raw(kinds_server.url, f"/v2/models/{TRANSFORMER}/infer", req)
    assert status == 200, body
    cut = Image.open(io.BytesIO(base64.b64decode(json.loads(body)["outputs"][0]["data"][0])))
    assert cut.mode == "RGBA" and cut.size == (512, 512)
    assert list(parse_timing(headers)) == [*TIMING[:-1], "encode", "app"]


@vision_only
async def test_detector_and_transformer_errors_take_oip_shape(kinds_server: Server, photos: dict[str, bytes]) -> None:
    u = kinds_server.url
    cat = base64.b64encode(photos["chelsea"]).decode()
    det, seg = f"/v2/models/{DETECTOR}/infer", f"/v2/models/{TRANSFORMER}/infer"
    await expect_error(u, "/v2/models/blazeface/infer", 404, f"serves '{MODEL}', '{DETECTOR}', '{TRANSFORMER}'",
                       image_json([cat]))
    await expect_error(u, det, 400, "unknown input 'input'; this model takes 'image' (BYTES, encoded images) only",
                       {"inputs": [{"name": "input", "shape": [1, 300, 300, 3], "datatype": "FP32", "data": [0]}]})
    await expect_error(u, det, 400, "element 1: not an image", image_json([cat, base64.b64encode(b"no").decode()]))
    await expect_error(u, det, 400, "parameter 'min_score' must be a number from 0 to 1",
                       {**image_json([cat]), "parameters": {"min_score": 2}})
    await expect_error(u, det, 400, "parameter 'max' must be a whole number", {**image_json([cat]),
                                                                              "parameters": {"max": 2.5}})
    await expect_error(u, det, 400, "unknown output 'transformed'", {**image_json([cat]),
                                                                     "outputs": [{"name": "transformed"}]})
    await expect_error(u, det, 400, "classification extension applies to a classifier's 'scores' only",
                       {**image_json([cat]), "outputs": [{"name": "scores", "parameters": {"classification": 2}}]})
    await expect_error(u, det, 400, "exceeds this server's queue of 8", image_json([cat] * 9))
    await expect_error(u, seg, 400, "parameter 'mode' must be one of blur, replace, cutout",
                       {**image_json([cat]), "parameters": {"mode": "sepia"}})
    await expect_error(u, seg, 400, "parameter 'format' must be jpeg or png (cutout: png",
                       {**image_json([cat]), "parameters": {"mode": "cutout", "format": "jpeg"}})
    await expect_error(u, seg, 400, "parameter 'color': color must be six hex digits",
                       {**image_json([cat]), "parameters": {"mode": "replace", "color": "green"}})
    status, _, body = await raw(u, seg, image_json([cat]))
    assert status == 200, body
