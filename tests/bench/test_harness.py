"""Smoke test of the benchmark harness: load generator, peers and tables against in-process
simulators and our router in a child process. It checks that the harness measures and that
the policies route; the benchmark's numbers are not asserted here."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from bench.load import (
    FixedTarget,
    JoinShortestQueue,
    RequestMix,
    RequestRecord,
    make_schedule,
    run_open_loop,
)
from bench.peers import (
    PEER_KEYS,
    IdealPeer,
    OursPeer,
    Peer,
    PeerUnavailable,
    make_peer,
    program_path,
)
from bench.scenarios import FULL_DEFAULT, MODULES, QUICK_DEFAULT, SCENARIOS
from bench.scenarios.harness import Options, tiny_vllm
from bench.scenarios.tables import latency_table
from bench.section import PeerRun
from bench.stats import percentile, replica_index, shares, summarize
from tests.support.sim import SIM_MODEL, get_stats, running_sims

SMALL = RequestMix(
    rate=25.0,
    duration=1.5,
    seed=7,
    short_tokens=(3, 6),
    long_tokens=(12, 20),
    prompt_words=(8, 40),
)


def test_schedule_is_seeded_and_follows_the_mix() -> None:
    mix = RequestMix(rate=50.0, duration=20.0, seed=3, omit_max_tokens_fraction=0.5)
    first, again = make_schedule(mix), make_schedule(mix)
    assert first == again
    assert first != make_schedule(RequestMix(rate=50.0, duration=20.0, seed=4))
    assert all(0 <= a.at < b.at < 20.0 for a, b in itertools.pairwise(first))
    assert 800 < len(first) < 1200  # Poisson at 50/s for 20 s
    streamed = sum(s.stream for s in first) / len(first)
    omitted = sum(s.max_tokens is None for s in first) / len(first)
    long = [s for s in first if s.max_tokens is not None and s.max_tokens >= 256]
    assert 0.85 < streamed < 0.95
    assert 0.4 < omitted < 0.6
    assert 0.1 < len(long) / (len(first) - sum(s.max_tokens is None for s in first)) < 0.3


def test_join_shortest_queue_picks_the_least_loaded_and_rotates_ties() -> None:
    jsq = JoinShortestQueue(["http://a", "http://b", "http://c"])
    picks = [jsq.acquire() for _ in range(3)]
    assert sorted(picks) == ["http://a", "http://b", "http://c"]
    jsq.release("http://b")
    assert jsq.acquire() == "http://b"


def test_stats_and_labels() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert math.isnan(percentile([], 99))
    urls = ["http://127.0.0.1:1000", "http://127.0.0.1:2000"]
    assert replica_index("127.0.0.1:1000, 127.0.0.1:2000", urls) == 1  # nginx after a retry
    assert replica_index("r0", urls) == 0  # HAProxy server name
    assert replica_index("http://127.0.0.1:1000", urls) == 0
    assert replica_index("", urls) is None
    assert shares([10, 5], [20, 35]) == [0.25, 0.75]
    records = [
        RequestRecord(0, True, 8, 0.0, 0.1, 1.0, 8, 200, "", ""),
        RequestRecord(1, False, 8, 0.5, None, 2.5, 8, 200, "", ""),
        RequestRecord(2, True, 8, 1.0, None, 1.2, 0, 0, "ClientConnectorError", ""),
    ]
    summary = summarize(records)
    assert (summary.requests, summary.errors) == (3, 1)
    assert summary.latency_mean == 1.5
    assert summary.tokens_per_s == 16 / 2.5


def test_a_peer_that_cannot_start_is_a_row_not_a_gap(tmp_path: Path) -> None:
    runs = [
        PeerRun("x", "missing router", unavailable="xyz is not installed"),
        PeerRun("ideal", "ideal (client JSQ)", records=[], shares=[0.5, 0.5]),
    ]
    table = latency_table(runs, ["r1", "r2"], window=10.0)
    assert table.rows[0][:2] == ["missing router", "not started: xyz is not installed"]
    assert len(table.rows) == 2
    assert all(len(row) == len(table.headers) for row in table.rows)


def test_a_missing_program_is_reported_unavailable() -> None:
    with pytest.raises(PeerUnavailable, match="no-such-router is not installed"):
        program_path("no-such-router")


async def _run(peer: Peer, backends: list[str]) -> tuple[list[RequestRecord], list[int]]:
    await peer.start(backends)
    try:
        before = [(await get_stats(u))["received"] for u in backends]
        records = await run_open_loop(peer.target(), make_schedule(SMALL), SIM_MODEL)
        after = [(await get_stats(u))["received"] for u in backends]
        return records, [a - b for a, b in zip(after, before, strict=True)]
    finally:
        peer.stop()


async def test_our_router_and_the_client_baselines_under_load(tmp_path: Path) -> None:
    async with running_sims(2, step_ms=2.0) as sims:
        urls = [s.url for s in sims]
        expected = len(make_schedule(SMALL))
        for policy in ("least-busy", "round-robin"):
            peer = OursPeer(tmp_path / policy, policy)
            records, received = await _run(peer, urls)
            assert [r.error for r in records if not r.ok] == []
            assert len(records) == expected == sum(received)
            assert all(r.tokens == r.max_tokens for r in records)
            assert all(r.ttft is not None and 0 < r.ttft <= r.latency for r in records if r.stream)
            assert min(received) > 0
            if policy == "round-robin":
                assert abs(received[0] - received[1]) <= 2
        records, received = await _run(IdealPeer(tmp_path / "ideal"), urls)
        assert all(r.ok for r in records) and min(received) > 0
        assert {r.replica for r in records} == set(urls)


async def test_least_busy_and_the_ideal_avoid_a_slow_replica(tmp_path: Path) -> None:
    async with running_sims(2, step_ms=2.0, max_num_seqs=4) as sims:
        await sims[1].control(speed=0.1)
        urls = [s.url for s in sims]
        for peer in (OursPeer(tmp_path / "lb", "least-busy"), IdealPeer(tmp_path / "ideal")):
            records, received = await _run(peer, urls)
            assert all(r.ok for r in records)
            assert received[1] < received[0], (peer.name, received)


async def test_router_cpu_time_is_measured(tmp_path: Path) -> None:
    async with running_sims(1, step_ms=1.0) as sims:
        peer = OursPeer(tmp_path / "cpu", "least-busy")
        await peer.start([sims[0].url])
        try:
            first = peer.cpu_seconds()
            records = await run_open_loop(
                FixedTarget(peer.url), make_schedule(SMALL)[:20], SIM_MODEL
            )
            second = peer.cpu_seconds()
        finally:
            peer.stop()
        assert all(r.ok for r in records)
        assert first is not None and second is not None and second >= first > 0


def test_every_scenario_module_is_registered_with_known_peers(tmp_path: Path) -> None:
    assert list(SCENARIOS) == [m.KEY for m in MODULES] == [str(n) for n in range(1, 13)]
    assert set(FULL_DEFAULT) | set(QUICK_DEFAULT) <= set(SCENARIOS)
    for module in MODULES:
        assert set(module.PEERS) | set(module.QUICK_PEERS) <= set(PEER_KEYS), module.__name__
    for key in PEER_KEYS:
        assert make_peer(key, tmp_path, "python").name


async def test_a_real_vllm_scenario_says_why_it_cannot_run(tmp_path: Path) -> None:
    """Scenarios 7 and 12 build the tiny model with the vLLM interpreter; when that fails the
    section says so in one line instead of starting replicas."""
    opts = Options(quick=True, workdir=tmp_path, python="python", vllm_python="/bin/false")
    assert (
        await tiny_vllm(opts) == "Not run: `/bin/false -m vllm_fleet.launcher.tiny_model` failed."
    )
