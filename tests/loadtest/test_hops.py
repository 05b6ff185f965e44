"""Server-Timing parsing, derived hops and the latency breakdown."""

from __future__ import annotations

import random

import pytest

from loadtest import hops


def test_parses_the_timing_contract_across_several_headers():
    got = hops.parse_server_timing([
        "decode;dur=1.5, preprocess;dur=2, queue;dur=0.25, infer;dur=10.125, postprocess;dur=0.5, app;dur=15",
        "upstream;dur=16.5, agent;dur=17",
        "lb;dur=0.2, tunnel;dur=20.5, tunnel_rtt;dur=0.3, edge;dur=21.25",
    ])
    assert got == {"decode": 1.5, "preprocess": 2.0, "queue": 0.25, "infer": 10.125, "postprocess": 0.5,
                   "app": 15.0, "upstream": 16.5, "agent": 17.0, "lb": 0.2, "tunnel": 20.5, "tunnel_rtt": 0.3,
                   "edge": 21.25}


def test_skips_entries_without_dur_and_handles_quoted_commas_and_params():
    got = hops.parse_server_timing(['cache;desc="hit, warm", db;desc="x;y";dur=3.5, miss, total;DUR="7"'])
    assert got == {"db": 3.5, "total": 7.0}


def test_garbage_does_not_raise():
    assert hops.parse_server_timing(["", ";;;", "x;dur=abc", "y;dur=nan", ",,,", 'z;desc="unterminated']) == {}


def test_the_fast_and_the_careful_parsers_agree():
    # Unquoted values take a regex; quoted ones a character-by-character
    # split. A desc="" with nothing in it forces the careful path on the
    # same entries.
    rng = random.Random(5)
    names = ["app", "infer", "edge", "db", "x-y", "cache"]
    for _ in range(500):
        entries = []
        for _ in range(rng.randint(0, 6)):
            name = rng.choice(names)
            params = rng.choice(["", ";dur=1.5", ";desc=x;dur=2", ";dur=3;desc=y", ";dur=bad", ";DUR=4e1", ";xdur=5",
                                 " ; dur = 6 ", ";dur=1e999"])
            entries.append(name + params)
        value = ", ".join(entries)
        fast = hops.parse_server_timing([value])
        careful = hops.parse_server_timing([value + ', q;desc=""'])
        assert fast == careful, value


def test_a_repeated_name_takes_the_last_entry():
    assert hops.parse_server_timing(["edge;dur=5", "edge;dur=9"]) == {"edge": 9.0}


def test_derived_hops_are_the_contract_differences():
    h = {"client_total": 30.0, "edge": 21.0, "tunnel": 20.0, "agent": 17.0, "upstream": 16.5, "app": 15.0}
    assert hops.derive(h) == {"net_client_edge": 9.0, "net_edge_worker": 3.0, "agent_overhead": 1.5}


def test_missing_entries_leave_their_derived_hops_out():
    # Talking to an inference server directly: no edge, no agent.
    assert hops.derive({"client_total": 12.0, "app": 10.0}) == {}
    assert hops.derive({"tunnel": 5.0}) == {}


def test_segments_add_up_to_the_latency_through_the_whole_chain():
    h = {"client_total": 30.0, "edge": 21.0, "lb": 0.5, "tunnel": 20.0, "agent": 17.0, "upstream": 16.5,
         "app": 15.0, "decode": 1.0, "preprocess": 2.0, "queue": 3.0, "infer": 7.0, "postprocess": 1.0}
    seg = hops.segments(31.0, h)
    assert seg == pytest.approx({"client_wait": 1.0, "net_client": 9.0, "lb": 0.5, "edge_internal": 0.5,
                                 "net_edge_worker": 3.0, "agent_internal": 0.5, "agent_overhead": 1.5,
                                 "decode": 1.0, "preprocess": 2.0, "queue": 3.0, "infer": 7.0, "postprocess": 1.0,
                                 "app_other": 1.0})
    assert sum(seg.values()) == pytest.approx(31.0)


def test_segments_of_a_direct_request_to_the_inference_server():
    seg = hops.segments(12.0, {"client_total": 12.0, "app": 10.0, "infer": 8.0})
    assert seg == pytest.approx({"client_wait": 0.0, "net_client": 2.0, "infer": 8.0, "app_other": 2.0})


def test_a_direct_worker_request_shows_the_edge_to_worker_leg_under_upstream():
    # client -> edge -> (VPN) -> app: the edge's own `upstream`, no tunnel, no agent.
    h = {"client_total": 30.0, "edge": 21.0, "lb": 0.5, "upstream": 20.0, "app": 15.0, "infer": 12.0}
    assert hops.derive(h) == {"net_client_edge": 9.0, "net_edge_direct": 5.0}
    seg = hops.segments(31.0, h)
    assert seg == pytest.approx({"client_wait": 1.0, "net_client": 9.0, "lb": 0.5, "edge_internal": 0.5,
                                 "net_edge_direct": 5.0, "infer": 12.0, "app_other": 3.0})
    assert sum(seg.values()) == pytest.approx(31.0)
    present = set(hops.node_values(31.0, h))
    depth = hops.depths(present)
    # edge > upstream > {net_edge_direct, app > infer}
    assert (depth["edge"], depth["upstream"], depth["net_edge_direct"], depth["app"], depth["infer"]) == (1, 2, 3, 3, 4)
    # Through an agent, upstream - app stays the agent's HTTP overhead.
    assert "agent_overhead" in hops.derive({"agent": 3.0, "upstream": 2.0, "app": 1.0})


def test_segments_of_a_plain_server_are_all_client_side():
    assert hops.segments(5.0, {"client_total": 4.0}) == pytest.approx({"client_wait": 1.0, "net_client": 4.0})


def test_hop_order_puts_client_first_and_unknown_names_last():
    names = ["infer", "zzz", "edge", "client_ttfb", "net_edge_worker"]
    assert sorted(names, key=hops.order_key) == ["client_ttfb", "net_edge_worker", "edge", "infer", "zzz"]
