"""The Grafana dashboard in deploy/grafana/ is valid JSON and every metric it
queries exists in the code, with the suffix its type exposes (a counter's
`_total`, a histogram's `_bucket`/`_sum`/`_count`, a gauge bare)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
# Where the metrics are declared (edge_proxy/metrics.py, the inference
# server's Metrics): every module of both packages, wherever they move.
SOURCES = sorted([*(ROOT / "edge_proxy").rglob("*.py"), *(ROOT / "inference").rglob("*.py")])
SUFFIXES = {"Counter": ("_total",), "Histogram": ("_bucket", "_sum", "_count"), "Gauge": ("",)}


def declared() -> dict[str, str]:
    """Every series name the code exposes -> the metric it belongs to."""
    out = {}
    for src in SOURCES:
        for node in ast.walk(ast.parse(src.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SUFFIXES
                    and node.args and isinstance(node.args[0], ast.Constant)):
                name = node.args[0].value
                for suffix in SUFFIXES[node.func.id]:
                    out[name + suffix] = name
    return out


def queried() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v.get("query", "") for v in dash["templating"]["list"] if isinstance(v.get("query"), str)]
    return {m for e in exprs for m in re.findall(r"(?<![$\w])((?:edge|inference)_[a-z0-9_]+)\b", e)}


def test_the_dashboard_is_valid_json_with_panels_for_both_servers():
    dash = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert any("Edge" in t for t in titles) and any("Inference" in t for t in titles)
    assert all(p["targets"] for p in dash["panels"] if p["type"] != "row")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_the_dashboard_queries_exists_in_the_code():
    names = declared()
    assert "edge_requests_total" in names and "inference_request_seconds_bucket" in names  # the parser sees them
    missing = sorted(queried() - set(names))
    assert missing == [], f"the dashboard queries metrics the code does not expose: {missing}"
    # Both servers are on the dashboard, and most of their metrics.
    used = {names[m] for m in queried()}
    assert sum(m.startswith("inference_") for m in used) >= 8 and sum(m.startswith("edge_") for m in used) >= 14
