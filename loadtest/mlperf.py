"""`loadtest mlperf`: MLPerf Inference scenarios (SingleStream, MultiStream,
Server, Offline) scheduled and judged by MLCommons' own LoadGen
(`mlcommons-loadgen`, the `mlperf` extra), with our aiohttp client as the
system under test and the built-in (or --samples) photos as the query sample
library.

Threads: LoadGen runs its test on a worker thread and calls `issue_queries`
from its own threads; each sample is handed to the asyncio loop (main
thread) with `call_soon_threadsafe`, sent as one HTTP request (`/photo` body
or an OIP infer request), and completed with `lg.QuerySamplesComplete` when
its answer has been read, failed or not (a failure is counted, and makes the
run INVALID for us even when LoadGen calls it VALID). LoadGen's logs
(`mlperf_log_summary.txt`, `mlperf_log_detail.txt`) are written to --out;
the result, why, the scenario's metric and the Server-Timing hops of the
same requests are printed and written as `loadtest_mlperf.json` beside them.
Reading LoadGen's verdict, and the peak search, are in `mlperfjudge.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from httpcontract.timing import parse as parse_server_timing

from . import __version__
from .hops import derive
from .mlperfjudge import PeakSearch, hop_table, metric, queries_needed, read_summary
from .runner import UsageError, load_images, tls_context

SCENARIOS = ("SingleStream", "MultiStream", "Server", "Offline")
DEFAULT_LATENCY_MS = 100.0  # Server's bound: image classification through a WAN
P99_EARLY_STOPPING_QUERIES = 662


@dataclass
class MlperfConfig:
    scenario: str
    url: str
    protocol: str = "photo"
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    ca: str | None = None
    insecure: bool = False
    pool: str | None = None
    target_qps: float | None = None  # Server: scheduled QPS; Offline: expected QPS
    target_latency_ms: float | None = None  # Server: the bound; Single/MultiStream: expected latency
    duration: float | None = None  # LoadGen's min_duration, seconds
    min_queries: int | None = None  # LoadGen's min_query_count
    samples: str | None = None
    out: str = "mlperf-out"
    concurrency: int = 16  # Offline: requests in flight at most
    peak_precision: float = 0.05  # --find-peak: stop when the bracket is this fraction of its top
    timeout: float = 30.0


# -------------------------------------------------------------- the SUT

class Sut:
    """Our HTTP client as LoadGen's system under test."""

    def __init__(self, cfg: MlperfConfig, loop: asyncio.AbstractEventLoop, session: aiohttp.ClientSession,
                 url: URL, bodies: list[tuple[bytes, str]], headers: dict[str, str], check: Any) -> None:
        self.cfg = cfg
        self.loop = loop
        self.session = session
        self.url = url
        self.bodies = bodies
        self.headers = headers
        self.check = check
        self.sem = asyncio.Semaphore(cfg.concurrency if cfg.scenario == "Offline" else 1 << 30)
        self.timings: list[dict[str, float]] = []
        self.errors: dict[str, int] = {}
        self.error_detail: dict[str, str] = {}
        self.sent = 0
        self.tasks: set[asyncio.Task[None]] = set()  # held until done (the loop keeps weak references)

    # LoadGen's threads
    def issue_queries(self, samples: list[Any]) -> None:
        pairs = [(s.id, s.index) for s in samples]
        try:
            self.loop.call_soon_threadsafe(self._start, pairs)
        except RuntimeError:  # the loop is gone (interrupted): let LoadGen finish at once
            import mlperf_loadgen as lg

            lg.QuerySamplesComplete([lg.QuerySampleResponse(sid, 0, 0) for sid, _ in pairs])

    def flush_queries(self) -> None:
        pass

    # the loop's thread
    def _start(self, pairs: list[tuple[int, int]]) -> None:
        for sid, index in pairs:
            t = self.loop.create_task(self._one(sid, index))
            self.tasks.add(t)
            t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task[None]) -> None:
        self.tasks.discard(t)

    async def _one(self, sid: int, index: int) -> None:
        import mlperf_loadgen as lg

        body, ctype = self.bodies[index % len(self.bodies)]
        headers = dict(self.headers)
        headers["Content-Type"] = ctype
        headers["X-Request-ID"] = f"mlperf-{sid & 0xffffffffffff:x}"
        error: str | None = None
        detail = ""
        try:
            async with self.sem:
                self.sent += 1
                t0 = time.perf_counter()
                async with self.session.post(self.url, data=body, headers=headers) as r:
                    data = await r.read()
                    client_ms = (time.perf_counter() - t0) * 1000
                    if r.status != 200:
                        error, detail = f"HTTP {r.status}", data[:200].decode("utf-8", "replace").strip()
                    else:
                        try:
                            self.check(r.headers, data)
                        except (ValueError, TypeError, KeyError, AttributeError) as exc:
                            error, detail = "bad answer", str(exc)
                    if error is None:
                        hops = parse_server_timing(r.headers.getall("Server-Timing", ()))
                        hops["client_total"] = client_ms
                        self.timings.append(hops | derive(hops))
        except asyncio.CancelledError:
            error = "cancelled"
            raise
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error, detail = exc.__class__.__name__, str(exc)
        finally:
            if error is not None:
                self.errors[error] = self.errors.get(error, 0) + 1
                self.error_detail.setdefault(error, detail)
            lg.QuerySamplesComplete([lg.QuerySampleResponse(sid, 0, 0)])


def _photo_check(headers: Any, body: bytes) -> None:
    answer = json.loads(body)
    if not isinstance(answer, dict) or answer.get("message") != "success":
        raise ValueError("not the inference server's JSON answer")


def settings_for(cfg: MlperfConfig, qps: float | None) -> Any:
    import mlperf_loadgen as lg

    s = lg.TestSettings()
    s.scenario = getattr(lg.TestScenario, cfg.scenario)
    s.mode = lg.TestMode.PerformanceOnly
    if cfg.duration is not None:
        s.min_duration_ms = int(cfg.duration * 1000)
    if cfg.min_queries is not None:
        s.min_query_count = cfg.min_queries
    elif cfg.scenario in ("Server", "MultiStream"):
        # The fewest queries with which LoadGen's early stopping can judge a
        # 99th percentile (its summary says so): fewer, and every run is INVALID.
        s.min_query_count = P99_EARLY_STOPPING_QUERIES
    lat_ns = int((cfg.target_latency_ms or DEFAULT_LATENCY_MS) * 1e6)
    if cfg.scenario == "Server":
        s.server_target_qps = qps or 10.0
        s.server_target_latency_ns = lat_ns
    elif cfg.scenario == "Offline":
        s.offline_expected_qps = qps or 50.0
    elif cfg.scenario == "SingleStream" and cfg.target_latency_ms:
        s.single_stream_expected_latency_ns = lat_ns
    elif cfg.scenario == "MultiStream" and cfg.target_latency_ms:
        s.multi_stream_expected_latency_ns = lat_ns
    return s


async def _prepare(cfg: MlperfConfig, session: aiohttp.ClientSession,
                   headers: dict[str, str]) -> tuple[URL, list[tuple[bytes, str]], Any]:
    images = load_images(cfg.samples)
    if cfg.protocol == "oip":
        from .oip import HEADER_LENGTH, bodies, choose_tensors, target, top1

        t = target(cfg.url, cfg.model)
        try:
            async with session.get(t.metadata_url, headers=headers) as r:
                body = await r.read()
                if r.status != 200:
                    raise UsageError(f"GET {t.metadata_url}: HTTP {r.status}: "
                                     f"{body[:200].decode('utf-8', 'replace').strip()}")
                t = choose_tensors(t, json.loads(body))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UsageError(f"cannot read the model's metadata at {t.metadata_url}: {exc}") from None
        except ValueError:
            raise UsageError(f"GET {t.metadata_url} is not JSON model metadata") from None
        built, width = bodies(images, t)
        headers[HEADER_LENGTH] = str(width)
        output = t.output

        def check(h: Any, b: bytes) -> None:
            top1(h, b, output)
        return t.infer_url, [(b, c) for _, b, c in built], check
    try:
        url = URL(cfg.url)
    except ValueError as exc:
        raise UsageError(f"--url {cfg.url!r} is not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise UsageError(f"--url {cfg.url!r}: need an http:// or https:// URL with a host")
    return url, [(data, ctype) for _, data, ctype in images], _photo_check


async def run_once(cfg: MlperfConfig, out: Path, qps: float | None) -> dict[str, Any]:
    """One LoadGen test; its logs go to `out`."""
    import mlperf_loadgen as lg

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: out.mkdir(parents=True, exist_ok=True))
    headers = {"User-Agent": f"loadtest/{__version__} mlperf"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    if cfg.pool:
        headers["X-Pool"] = cfg.pool
    connector = aiohttp.TCPConnector(ssl=tls_context(cfg.ca, cfg.insecure), limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     timeout=aiohttp.ClientTimeout(total=cfg.timeout)) as session:
        url, bodies, check = await _prepare(cfg, session, headers)
        sut = Sut(cfg, loop, session, url, bodies, headers, check)
        n = len(bodies)
        lg_sut = lg.ConstructSUT(sut.issue_queries, sut.flush_queries)
        lg_qsl = lg.ConstructQSL(n, n, lambda _: None, lambda _: None)
        log = lg.LogSettings()
        log.log_output.outdir = str(out)
        log.log_output.copy_summary_to_stdout = False
        settings = settings_for(cfg, qps)
        t0 = time.perf_counter()
        finished: asyncio.Future[None] = loop.create_future()

        def test() -> None:
            try:
                lg.StartTestWithLogSettings(lg_sut, lg_qsl, settings, log)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone after an interruption
                    loop.call_soon_threadsafe(done)

        def done() -> None:
            if not finished.done():
                finished.set_result(None)

        # A daemon thread: after Ctrl-C the process exits without waiting for LoadGen.
        threading.Thread(target=test, name="loadgen", daemon=True).start()
        await finished
        lg.DestroyQSL(lg_qsl)
        lg.DestroySUT(lg_sut)
        wall = time.perf_counter() - t0
    res = read_summary(out)
    summary = res.pop("summary")
    ours: list[str] = []
    errors = sum(sut.errors.values())
    if errors:
        ours.append(f"{errors} of {sut.sent} requests failed: " + "; ".join(
            f"{k} x{v} ({sut.error_detail.get(k, '')[:120]})" for k, v in sut.errors.items()))
    valid = res["result"] == "VALID" and not errors
    return {
        "scenario": cfg.scenario, "target_qps": qps, "loadgen_result": res["result"],
        "result": "VALID" if valid else "INVALID", "why": res["why"] + ours, "early_stopping": res["early_stopping"],
        "metric": metric(cfg.scenario, res["detail"]), "requests": sut.sent, "errors": sut.errors,
        "wall_s": round(wall, 2), "hops_ms": hop_table(sut.timings), "loadgen": res["detail"], "out": str(out),
        "_summary": summary,
    }


async def measure(cfg: MlperfConfig, find_peak: bool, say: Any) -> dict[str, Any]:
    out = Path(cfg.out)
    if not find_peak:
        return await run_once(cfg, out, cfg.target_qps)
    search = PeakSearch(cfg.target_qps or 10.0, precision=cfg.peak_precision)
    runs: list[dict[str, Any]] = []
    while (qps := search.next_qps()) is not None:
        res = await run_once(cfg, out / f"server-{qps:g}qps", qps)
        need = queries_needed(res)
        if need is not None:
            # Judged too early, not too slow: once, give LoadGen the queries it asked for.
            say(f"find-peak: {qps:g} QPS: early stopping needs {need} queries; running again with them")
            res = await run_once(replace(cfg, min_queries=need), out / f"server-{qps:g}qps", qps)
        search.record(qps, res["result"] == "VALID")
        say(f"find-peak: {qps:g} QPS -> {res['result']}" + (f" ({res['why'][0]})" if res["why"] else ""))
        runs.append(res)
    best = next((r for r in runs if r["target_qps"] == search.peak and r["result"] == "VALID"), None)
    top = dict(best or runs[-1])
    top["find_peak"] = {"peak_qps": search.peak, "latency_bound_ms": cfg.target_latency_ms or DEFAULT_LATENCY_MS,
                        "steps": [{"target_qps": r["target_qps"], "result": r["result"], "why": r["why"],
                                   "metric": r["metric"]} for r in runs]}
    return top


# -------------------------------------------------------------- command line
