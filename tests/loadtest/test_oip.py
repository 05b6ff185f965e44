"""`loadtest classify --protocol oip` against the real inference server's
Open Inference Protocol: the same report as /photo, hops included."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.oip import bodies, choose_tensors, target, top1
from loadtest.runner import UsageError, load_images
from tests.inference.conftest import Server, start_server
from tests.loadtest.conftest import loadtest

MODEL = "efficientnet-lite0"
CAT_CLASSES = {"tabby", "tiger_cat", "Egyptian_cat", "Persian_cat", "Siamese_cat", "lynx"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server("onnxruntime", tmp_path_factory.mktemp("logs"), tmp_path_factory.mktemp("cache"))
    try:
        yield s
    finally:
        s.proc.stop()


def test_classify_over_oip_gives_the_same_report(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "oip.json"
    r = loadtest("classify", "--protocol", "oip", "--model", MODEL, "--url", server.url, "--concurrency", "2",
                 "--requests", "24", "--warmup", "0.3", "--json", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["ok"] == 24 and res["errors"] == 0, res.get("cause")
    assert res["config"]["protocol"] == "oip" and res["config"]["model"] == MODEL
    # The built-in samples: a cat among them, labelled through the classification extension.
    assert set(res["labels"]) & CAT_CLASSES, res["labels"]
    for hop in ("decode", "preprocess", "queue", "infer", "postprocess", "app", "client_total"):
        assert res["hops_ms"][hop]["count"] == 24, hop
    assert res["hops_ms"]["app"]["p50"] <= res["latency_ms"]["p50"]
    # An infer URL works as well as the base URL, in open loop.
    r = loadtest("classify", "--protocol", "oip", "--url", f"{server.url}/v2/models/{MODEL}/infer", "--rate", "20",
                 "--duration", "1", "--warmup", "0.2", "--json", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["errors"] == 0


def test_oip_usage_errors_are_one_line(server: Server) -> None:
    r = loadtest("classify", "--protocol", "oip", "--model", "resnet50", "--url", server.url, "--requests", "5",
                 "--concurrency", "1")
    assert r.returncode == 2
    assert "HTTP 404" in r.stderr and "unknown model 'resnet50'" in r.stderr
    r = loadtest("classify", "--protocol", "oip", "--url", server.url, "--requests", "5", "--concurrency", "1")
    assert r.returncode == 2 and "needs --model" in r.stderr


def test_request_bodies_share_one_header_length() -> None:
    t = choose_tensors(target("http://h:1/base", "m"), {"inputs": [{"name": "x", "datatype": "FP32"},
                                                                   {"name": "jpeg", "datatype": "BYTES"}],
                                                        "outputs": [{"name": "probs"}]})
    assert str(t.infer_url) == "http://h:1/base/v2/models/m/infer" and (t.input, t.output) == ("jpeg", "probs")
    images = load_images(None)
    built, width = bodies(images, t)
    for (_, data, _), (_, body, _) in zip(images, built, strict=True):
        head = json.loads(body[:width])
        assert head["inputs"][0]["name"] == "jpeg" and head["outputs"][0]["name"] == "probs"
        assert len(body) - width == head["inputs"][0]["parameters"]["binary_data_size"] == 4 + len(data)
    with pytest.raises(UsageError, match="no BYTES input"):
        choose_tensors(t, {"inputs": [{"name": "x", "datatype": "FP32"}], "outputs": [{"name": "y"}]})
    assert top1({}, b'{"outputs":[{"name":"probs","data":["0.9:3:cat","0.1:4:dog"]}]}', "probs") == "cat"
    assert top1({}, b'{"outputs":[{"name":"probs","data":["0.9:3"]}]}', "probs") == "3"
    with pytest.raises(ValueError):
        top1({}, b'{"outputs":[]}', "probs")
