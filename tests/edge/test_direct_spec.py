"""Direct worker declarations (`--direct`, `--directs FILE`): what is taken,
what is refused and what the refusal says; the set applied to a registry
(added, removed, replaced); a direct worker's admission on proof."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_proxy import direct_spec
from edge_proxy.config import EdgeConfig
from edge_proxy.direct import DIRECT_TUNNEL, DirectWorkers
from edge_proxy.direct_spec import (
    DEFAULT_CAPACITY,
    DirectSpec,
    DirectSpecError,
    parse_direct,
    parse_lines,
)
from edge_proxy.health import HealthPolicy, WorkerHealth
from edge_proxy.registry import Registry
from edge_proxy.state import EdgeState
from runtime import settings


def test_minimal_declaration_takes_the_defaults():
    s = parse_direct("default=http://10.77.0.2:8000")
    assert s == DirectSpec("default", "http://10.77.0.2:8000", "10.77.0.2", 8000, DEFAULT_CAPACITY, "",
                           "direct-10.77.0.2:8000")


def test_every_option_and_a_trailing_slash():
    s = parse_direct(" gpu=http://worker-1.vpn:9000/ , capacity=16 , health=/v2/health/ready , id=w1 ")
    assert (s.pool, s.url, s.capacity, s.health, s.id) == ("gpu", "http://worker-1.vpn:9000", 16,
                                                           "/v2/health/ready", "w1")


def test_ipv6_hosts_keep_their_brackets():
    s = parse_direct("default=http://[fd00::2]:8000")
    assert (s.url, s.host, s.id) == ("http://[fd00::2]:8000", "fd00::2", "direct-[fd00::2]:8000")


@pytest.mark.parametrize(("text", "words"), [
    ("http://10.77.0.2:8000", "must start with POOL=URL"),
    ("default=", "must start with POOL=URL"),
    ("bad pool=http://10.77.0.2:8000", "pool name"),
    ("default=10.77.0.2:8000", "must start with http://"),
    ("default=https://10.77.0.2:8443", "https:// is not supported yet"),
    ("default=http://10.77.0.2", "needs a host and a port"),
    ("default=http://:8000", "needs a host and a port"),
    ("default=http://10.77.0.2:99999", "bad URL"),
    ("default=http://user:pw@10.77.0.2:8000", "no user or password"),
    ("default=http://10.77.0.2:8000/v1", "must not have a path"),
    ("default=http://10.77.0.2:8000/?x=1", "must not have a path, query"),
    ("default=http://10.77.0.2:8000,capacity=0", "capacity must be a whole number"),
    ("default=http://10.77.0.2:8000,capacity=lots", "capacity must be a whole number"),
    ("default=http://10.77.0.2:8000,health=healthz", "health path"),
    ("default=http://10.77.0.2:8000,id=a b", "id 'a b'"),
    ("default=http://10.77.0.2:8000,weight=3", "unknown option 'weight=3'"),
    ("default=http://10.77.0.2:8000,id=a,id=b", "id= is given twice"),
])
def test_bad_declarations_say_what_is_wrong_and_show_the_syntax(text: str, words: str):
    with pytest.raises(DirectSpecError) as info:
        parse_direct(text)
    msg = str(info.value)
    assert words in msg and direct_spec.SYNTAX in msg and "\n" not in msg, msg


def test_file_lines_comments_pasted_flags_and_errors_by_line(tmp_path: Path):
    text = ("# VPN workers\n\n"
            "default=http://10.77.0.2:8000,id=w1   # the first\n"
            "--direct gpu=http://10.77.0.3:8000,id=w2\n")
    assert [s.id for s in parse_lines(text, "f")] == ["w1", "w2"]
    with pytest.raises(DirectSpecError, match=r"^directs line 2: 'default=ftp://x:1'"):
        parse_lines("default=http://a:1\ndefault=ftp://x:1\n", "directs")
    f = tmp_path / "directs"
    f.write_text(text)
    flags = [parse_direct("default=http://10.77.0.9:8000")]
    assert [s.id for s in direct_spec.load(flags, str(f))] == ["direct-10.77.0.9:8000", "w1", "w2"]
    with pytest.raises(DirectSpecError, match="declared twice"):
        direct_spec.load([parse_direct("default=http://10.0.0.1:1,id=w1")], str(f))
    with pytest.raises(DirectSpecError, match="cannot read --directs file"):
        direct_spec.load([], str(tmp_path / "missing"))


def test_flags_repeat_and_the_variable_separates_with_semicolons():
    cfg = settings.resolve(EdgeConfig, "EDGE", environ={
        "EDGE_DIRECT": "default=http://10.77.0.2:8000,id=w1;gpu=http://10.77.0.3:8000,capacity=2"})
    assert [(s.pool, s.id, s.capacity) for s in cfg.direct] == [("default", "w1", 4),
                                                              ("gpu", "direct-10.77.0.3:8000", 2)]
    with pytest.raises(settings.SettingError, match="EDGE_DIRECT: 'default=http://x'"):
        settings.resolve(EdgeConfig, "EDGE", environ={"EDGE_DIRECT": "default=http://x"})


def test_a_direct_worker_is_admitted_on_proof():
    # Fake clock: the edge's first check decides; until then it takes nothing.
    h = WorkerHealth(HealthPolicy(unhealthy_threshold=2, healthy_threshold=1), checks_healthy=False)
    assert not h.is_available(0.0)
    h.record_check(0.1, True)
    assert h.is_available(0.1)
    h.record_check(2.1, False, "cannot connect")
    assert h.is_available(2.1)  # one failure is not yet down
    h.record_check(4.2, False, "cannot connect")
    assert not h.is_available(4.2) and h.state(4.2) == "unhealthy"


async def test_applying_a_new_set_adds_removes_and_replaces():
    cfg = EdgeConfig(grace=0.1)
    state = EdgeState(cfg, None, None)  # type: ignore[arg-type]  # no credentials needed here
    state.registry = Registry(cfg.health)
    workers = DirectWorkers(state)
    a = parse_direct("default=http://127.0.0.1:9,id=a")
    b = parse_direct("default=http://127.0.0.1:9,id=b")
    done = workers.apply([a, b])
    assert done["added"] == ["a", "b"]
    reg = state.registry
    assert {w.agent_id: (w.kind, w.url) for w in reg.workers.values()} == {
        "a": ("direct", "http://127.0.0.1:9"), "b": ("direct", "http://127.0.0.1:9")}
    assert not reg.workers["a"].available(0.0)  # not yet proven
    first_b = workers.sessions["b"]
    b2 = parse_direct("gpu=http://127.0.0.1:9,id=b,capacity=2")
    done = workers.apply([b2])
    assert (done["removed"], done["replaced"]) == (["a"], ["b"])
    assert set(reg.workers) == {"b"} and reg.workers["b"].pool == "gpu" and reg.workers["b"].capacity == 2
    assert not first_b.accepting and workers.sessions["b"].accepting
    assert reg.workers["b"].sessions[DIRECT_TUNNEL] is workers.sessions["b"]
    assert workers.apply([b2])["unchanged"] == ["b"]
    await workers.close()
    assert not workers.sessions


@pytest.mark.parametrize(("capacity", "processes", "shares"), [
    (4, 1, [4]), (5, 2, [3, 2]), (8, 3, [3, 3, 2]), (2, 4, [1, 1, 1, 1]), (1, 1, [1]),
])
def test_processes_share_a_direct_workers_capacity_without_exceeding_it(capacity, processes, shares):
    from edge_proxy.direct import share

    got = [share(capacity, processes, i) for i in range(processes)]
    assert got == shares
    assert sum(got) == max(capacity, processes)  # exact, or one each when there are fewer slots than processes
