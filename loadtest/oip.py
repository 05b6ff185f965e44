"""The load tester speaking the Open Inference Protocol (v2): each image goes
as one infer request with a BYTES input in binary form (the binary tensor
data extension, as NVIDIA's clients send it) and asks for the top-1 of the
classification extension, so any OIP server (ours, Triton, KServe, OVMS) can
be measured with the same report as `/photo`.

The model's input and output names come from its metadata
(`GET /v2/models/NAME`): the first BYTES input, the first output. Bodies are
built once per image before the run; their JSON headers are padded to one
length so every request carries the same `Inference-Header-Content-Length`.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from .runner import Record, Run, RunConfig, UsageError

HEADER_LENGTH = "Inference-Header-Content-Length"
PROTOCOLS = ("photo", "oip")


@dataclass(frozen=True)
class Target:
    """Where and what to ask: the infer URL, the model's BYTES input and the output to classify."""
    infer_url: URL
    metadata_url: URL
    model: str
    input: str = "image"
    output: str = "scores"


def target(url: str, model: str | None) -> Target:
    """The OIP URLs from --url (a server's base URL, or a model's infer URL) and --model."""
    try:
        u = URL(url)
    except ValueError as exc:
        raise UsageError(f"--url {url!r} is not a valid URL: {exc}") from None
    parts = u.path.rstrip("/").split("/")
    if "models" in parts and parts[-1] == "infer":
        i = parts.index("models")
        if i + 1 >= len(parts) - 1:
            raise UsageError(f"--url {url}: no model name between /models/ and /infer")
        named = parts[i + 1]
        if model and model != named:
            raise UsageError(f"--model {model} but --url names model {named}")
        return Target(u, u.with_path("/".join(parts[:i + 2])), named)
    if not model:
        raise UsageError("--protocol oip needs --model NAME (or an --url ending in /v2/models/NAME/infer)")
    base = u.path.rstrip("/")
    meta = u.with_path(f"{base}/v2/models/{model}", encoded=False)
    return Target(meta.with_path(meta.path + "/infer"), meta, model)


def choose_tensors(t: Target, metadata: dict[str, Any]) -> Target:
    """The first BYTES input and the first output of the model's metadata."""
    inputs = [i for i in metadata.get("inputs", []) if isinstance(i, dict) and i.get("datatype") == "BYTES"]
    outputs = [o for o in metadata.get("outputs", []) if isinstance(o, dict) and isinstance(o.get("name"), str)]
    if not inputs:
        kinds = ", ".join(f"{i.get('name')} ({i.get('datatype')})" for i in metadata.get("inputs", [])
                          if isinstance(i, dict))
        raise UsageError(f"model {t.model} takes no BYTES input (encoded images), only: {kinds or 'nothing'}")
    if not outputs:
        raise UsageError(f"model {t.model} declares no outputs in its metadata")
    return Target(t.infer_url, t.metadata_url, t.model, str(inputs[0]["name"]), str(outputs[0]["name"]))


def bodies(images: list[tuple[str, bytes, str]], t: Target) -> tuple[list[tuple[str, bytes, str]], int]:
    """(name, request body, content type) per image, and the one JSON header length they share."""
    heads = []
    for _, data, _ in images:
        doc = {"inputs": [{"name": t.input, "shape": [1], "datatype": "BYTES",
                           "parameters": {"binary_data_size": 4 + len(data)}}],
               "outputs": [{"name": t.output, "parameters": {"classification": 1, "binary_data": False}}]}
        heads.append(json.dumps(doc, separators=(",", ":")).encode())
    width = max(len(h) for h in heads)
    out = [(name, h.ljust(width) + struct.pack("<I", len(data)) + data, "application/octet-stream")
           for (name, data, _), h in zip(images, heads, strict=True)]
    return out, width


def top1(headers: Any, body: bytes, output: str) -> str:
    """The label of the first image's top-1 string ("score:index:label"), or ValueError why not."""
    n = headers.get(HEADER_LENGTH)
    head = body[:int(n)] if n is not None else body
    doc = json.loads(head)
    for o in doc.get("outputs", []):
        if isinstance(o, dict) and o.get("name") == output:
            data = o.get("data")
            if not isinstance(data, list) or not data or not isinstance(data[0], str):
                raise ValueError(f"output {output} carries no classification strings")
            fields = data[0].split(":", 2)
            if len(fields) < 2:
                raise ValueError(f"output {output}: {data[0][:40]!r} is not score:index[:label]")
            return fields[2] if len(fields) == 3 and fields[2] else fields[1]
    raise ValueError(f"no output {output} in the answer")


class OipRun(Run):
    """A classify run whose requests are OIP infer requests. The model's
    metadata is read once before the load starts."""

    def __init__(self, cfg: RunConfig, stop: asyncio.Event | None = None) -> None:
        super().__init__(cfg, stop)
        self.target = target(cfg.url, cfg.model)
        self.url = self.target.infer_url
        self._raw_images = self.images

    async def execute(self) -> list[Record]:
        await self._discover()
        return await super().execute()

    async def _discover(self) -> None:
        t = self.target
        connector = aiohttp.TCPConnector(ssl=self._ssl)
        try:
            async with aiohttp.ClientSession(connector=connector,
                                             timeout=aiohttp.ClientTimeout(total=self.cfg.timeout)) as s, \
                    s.get(t.metadata_url, headers=self.headers) as r:
                body = await r.read()
                if r.status != 200:
                    raise UsageError(f"GET {t.metadata_url}: HTTP {r.status}: "
                                     f"{body[:200].decode('utf-8', 'replace').strip()}")
                meta = json.loads(body)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise UsageError(f"cannot read the model's metadata at {t.metadata_url}: {exc or type(exc).__name__}") \
                from None
        except ValueError:
            raise UsageError(f"GET {t.metadata_url} is not JSON model metadata") from None
        if not isinstance(meta, dict):
            raise UsageError(f"GET {t.metadata_url} is not JSON model metadata")
        self.target = choose_tensors(t, meta)
        self.images, width = bodies(self._raw_images, self.target)
        self.headers[HEADER_LENGTH] = str(width)

    def _check(self, rec: Record, r: aiohttp.ClientResponse, body: bytes) -> None:
        if r.status != 200:
            super()._check(rec, r, body)
            return
        try:
            rec.label = top1(r.headers, body, self.target.output)
        except (ValueError, TypeError, AttributeError) as exc:
            rec.error = "bad answer"
            self.details.setdefault("bad answer", f"not an OIP infer answer: {exc}")
            return
        rec.ok = True
