"""The prefix-cache scenarios' parts (8, 9, 10): their traffic, the oracle that grades hit rates,
the consistent-hashing pick, follow-up turns, the replicas' counters and the router with its
prefix index stubbed out. The benchmark's numbers are not asserted here."""

from __future__ import annotations

import itertools
import statistics
from collections import Counter
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from bench.load import (
    BoundedLoadHash,
    ConversationMix,
    FixedTarget,
    PrefixMix,
    RequestRecord,
    RequestSpec,
    make_conversation_schedule,
    make_prefix_schedule,
    request_body,
    run_open_loop,
)
from bench.peers import OursPairPeer, OursPeer, make_peer
from bench.prefix_oracle import best_hit_rate, prompt_ids, reply_text
from bench.replicas import SimFleet, SimReplica, SimSettings
from bench.scenarios.prefix import by_key, cache_use, offered_load, prefix_table
from bench.scenarios.prefix_overhead import round_ratios
from bench.scenarios.s8_shared_prefix import shared_prefix_targets
from bench.scenarios.s12_real_prefix import real_prefix_table, real_prefix_targets
from bench.section import PeerRun
from tests.support.metrics import metric_value, scrape_metrics
from tests.support.sim import SIM_MODEL, running_sims


def test_shared_prefix_schedule_is_seeded_and_groups_share_their_system_prompt() -> None:
    mix = PrefixMix(rate=20.0, duration=10.0, seed=5, groups=8, prefix_tokens=200)
    first = make_prefix_schedule(mix)
    assert first == make_prefix_schedule(mix)
    assert first != make_prefix_schedule(PrefixMix(rate=20.0, duration=10.0, seed=6, groups=8))
    systems: dict[str, set[str]] = {}
    for spec in first:
        (role, system), (user, question) = spec.messages
        assert (role, user) == ("system", "user")
        systems.setdefault(spec.group, set()).add(system)
        assert question.startswith(f"Question {spec.index}:")
        assert 190 * 4 <= len(system.encode()) <= 210 * 4
    assert all(len(texts) == 1 for texts in systems.values())  # one prompt per group
    assert len({next(iter(t)) for t in systems.values()}) == len(systems)  # groups differ
    assert len(systems) == 8


def test_zipf_groups_make_one_group_much_hotter() -> None:
    uniform = Counter(s.group for s in make_prefix_schedule(PrefixMix(20.0, 100.0)))
    skewed = Counter(s.group for s in make_prefix_schedule(PrefixMix(20.0, 100.0, zipf=1.4)))
    total = sum(skewed.values())
    assert max(uniform.values()) / sum(uniform.values()) < 0.05
    hottest, second = (count for _, count in skewed.most_common(2))
    assert 0.3 < hottest / total < 0.46
    assert hottest > 2 * second


def test_each_turn_resends_its_conversation_and_follows_the_turn_before() -> None:
    schedule = make_conversation_schedule(ConversationMix(rate=2.0, duration=30.0, seed=3))
    assert schedule == make_conversation_schedule(ConversationMix(2.0, 30.0, seed=3))
    assert all(a.at <= b.at for a, b in itertools.pairwise(schedule))
    assert [s.index for s in schedule] == list(range(len(schedule)))
    followed = [s for s in schedule if s.follows is not None]
    assert len(followed) > len(schedule) // 2
    for spec in followed:
        assert spec.follows is not None
        previous = schedule[spec.follows]
        assert previous.group == spec.group and previous.at < spec.at
        # The whole previous chat, then the reply the client got, then the new message.
        assert spec.messages[: len(previous.messages)] == previous.messages
        assert [r for r, _ in spec.messages[len(previous.messages) :]] == ["assistant", "user"]
        assert prompt_ids(spec)[: len(prompt_ids(previous))] == prompt_ids(previous)
    firsts = [s for s in schedule if s.follows is None]
    assert len({s.group for s in firsts}) == len(firsts)


async def test_a_turn_resends_the_reply_the_simulator_gave_and_hits_it() -> None:
    schedule = make_conversation_schedule(
        ConversationMix(rate=1.0, duration=8.0, seed=2, turns=(2, 2), think_s=(1.0, 1.0)),
        reply_text,
    )
    first = next(s for s in schedule if s.follows is None)
    second = next(s for s in schedule if s.follows == first.index)
    async with running_sims(1, step_ms=1.0) as sims:
        url = sims[0].url
        body = request_body(replace(first, stream=False), SIM_MODEL)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{url}/v1/chat/completions", json=body) as response,
        ):
            answer = (await response.json())["choices"][0]["message"]["content"]
        assert second.messages[len(first.messages)] == ("assistant", answer)
        before = await scrape_metrics(url)
        await run_open_loop(FixedTarget(url), [replace(second, at=0.0, follows=None)], SIM_MODEL)
        after = await scrape_metrics(url)
    hits = metric_value(after, "vllm:prefix_cache_hits_total") - metric_value(
        before, "vllm:prefix_cache_hits_total"
    )
    # The first turn's prompt and all but the last generated token were cached, whole blocks.
    assert first.max_tokens is not None
    computed = len(prompt_ids(first)) + first.max_tokens - 1
    assert hits == computed - computed % 16
    assert best_hit_rate([first, second], 16, 10_000) == hits / (
        len(prompt_ids(first)) + len(prompt_ids(second))
    )


def _chat(index: int, system: str, question: str) -> RequestSpec:
    messages = (("system", system), ("user", question))
    return RequestSpec(index, 0.02 * index, question, 8, True, messages=messages)


def test_the_oracle_counts_hits_like_the_replicas() -> None:
    system = "s" * 4 * 160  # 160 tokens of content: the first 10 blocks of 16 are shared
    first, second = _chat(0, system, "q" * 40), _chat(1, system, "r" * 40)
    ids = prompt_ids(first)
    # The system message's 2 template ids + 160 content ids make 10 full 16-token blocks.
    assert len(ids) == 2 + 160 + 2 + 2 + 10 + 2 + 2
    assert best_hit_rate([first], 16, 1000) == 0.0
    expected = 10 * 16 / (2 * len(ids))
    assert best_hit_rate([first, second], 16, 1000) == expected
    # The same request twice hits every full block but never its last token.
    again = best_hit_rate([first, _chat(1, system, "q" * 40)], 16, 1000)
    assert again == ((len(ids) - 1) // 16 * 16) / (2 * len(ids))
    # A cache that holds nothing of the first request's blocks by the second: no hits.
    assert best_hit_rate([first, second], 16, 0) == 0.0


def test_bounded_load_hashing_keeps_a_key_until_its_replica_is_too_busy() -> None:
    urls = [f"http://r{i}" for i in range(4)]
    ring = BoundedLoadHash(urls)
    home = ring.acquire("group-7")
    ring.release(home)
    assert ring.acquire("group-7") == home
    # With 1 in flight the cap is ceil(1.25 * 2 / 4) = 1: the next request spills over.
    spilled = ring.acquire("group-7")
    assert spilled != home
    ring.release(spilled)
    ring.release(home)
    homes = {ring.acquire(f"group-{g}") for g in range(40)}
    assert homes == set(urls)  # keys spread over every replica
    assert max(ring.in_flight.values()) <= 13  # 40 in flight: the cap is ceil(1.25 * 40 / 4)


async def test_a_follow_up_turn_waits_for_the_answer_before_it() -> None:
    async with running_sims(1, step_ms=5.0) as sims:
        first = RequestSpec(0, 0.0, "hello", 20, True, group="c")
        second = RequestSpec(1, 0.01, "again", 4, True, group="c", follows=0)
        records = await run_open_loop(FixedTarget(sims[0].url), [first, second], SIM_MODEL)
    assert all(r.ok for r in records)
    assert records[1].start >= records[0].end


async def test_replica_counters_and_cache_reset(tmp_path: Path) -> None:
    async with running_sims(2, step_ms=1.0) as sims:
        settings = SimSettings(model=SIM_MODEL)
        fleet = SimFleet([SimReplica(settings, tmp_path, port=s.port) for s in sims])
        system = "shared system prompt " * 60
        schedule = [_chat(i, system, f"question {i}") for i in range(3)]
        for spec in schedule[:2]:  # one after the other: the second finds the first cached
            await run_open_loop(FixedTarget(sims[0].url), [spec], SIM_MODEL)
        counters = await fleet.prefix_counters()
        assert counters[0][0] > 0 and counters[1] == (0.0, 0.0)
        assert counters[0][1] == sum(len(prompt_ids(s)) for s in schedule[:2])
        await fleet.reset_prefix_caches()
        await run_open_loop(FixedTarget(sims[0].url), [schedule[2]], SIM_MODEL)
        assert (await fleet.prefix_counters())[0][0] == counters[0][0]  # forgotten: no hit


async def test_the_index_stub_and_two_routers(tmp_path: Path) -> None:
    """`ours-cost-noindex` records nothing in the prefix index; the pair sends through both."""
    async with running_sims(2, step_ms=1.0) as sims:
        urls = [s.url for s in sims]
        system = "shared system prompt " * 60
        schedule = [_chat(i, system, f"question {i}") for i in range(6)]
        for on in (True, False):
            peer = OursPeer(tmp_path / str(on), "cost", prefix_index=on)
            await peer.start(urls)
            try:
                records = await run_open_loop(peer.target(), schedule, SIM_MODEL)
                entries = metric_value(
                    await scrape_metrics(peer.url), "vllm_fleet_prefix_index_entries"
                )
            finally:
                peer.stop()
            assert all(r.ok for r in records)
            assert (entries > 0) is on, (on, entries)
        pair = OursPairPeer(tmp_path / "pair", "cost")
        await pair.start(urls)
        try:
            records = await run_open_loop(pair.target(), schedule, SIM_MODEL)
            sent = [
                metric_value(await scrape_metrics(r.url), "vllm_fleet_prefix_index_entries")
                for r in pair.routers
            ]
            used = pair.cpu_seconds()
        finally:
            pair.stop()
        assert all(r.ok for r in records)
        assert min(sent) > 0 and used is not None and used > 0
        peered = OursPairPeer(tmp_path / "peered", "cost", peered=True)
        await peered.start(urls)
        try:
            records = await run_open_loop(peered.target(), schedule, SIM_MODEL)
            views = []
            async with aiohttp.ClientSession() as session:
                for r in peered.routers:
                    async with session.get(f"{r.url}/fleet/peers") as resp:
                        views.append(await resp.json())
        finally:
            peered.stop()
        assert all(r.ok for r in records)
        assert [v["peers"] for v in views] == [[peered.routers[1].url], [peered.routers[0].url]]
        assert all(v["requests_received"] > 0 for v in views)


def test_tables_and_targets_from_runs() -> None:
    schedule = make_prefix_schedule(PrefixMix(rate=10.0, duration=5.0))
    assert 0.3 < offered_load(schedule, 5.0) < 1.2
    ours = PeerRun("ours-cost", "ours cost", extra={"cache_hits": 80.0, "cache_queries": 100.0})
    ideal = PeerRun("ideal", "ideal", extra={"cache_hits": 40.0, "cache_queries": 100.0})
    missing = PeerRun("sglang-ca", "sglang-router cache_aware", unavailable="not installed")
    assert cache_use(ours).hit_rate == 0.8
    table = prefix_table([ours, ideal, missing], best=0.85)
    assert table.rows[0][3:5] == ["80%", "94%"]
    assert table.rows[2][1].startswith("not started")
    assert by_key([ours, ideal, missing]) == {}  # no records: nothing ran
    targets = shared_prefix_targets([ours, ideal, missing], 0.85)
    assert [t.met for t in targets] == [False]  # "our router ran": no records


def test_the_index_overhead_reads_round_by_round_ratios() -> None:
    """One slowed run moves one ratio, not the median the target reads; a round whose pair
    did not run is left out."""

    def run(cpu_s: float, requests: int, unavailable: str = "") -> PeerRun:
        record = RequestRecord(0, False, 16, 0.0, None, 0.1, 16, 200, "", "")
        return PeerRun("k", "n", unavailable=unavailable, records=[record] * requests, cpu_s=cpu_s)

    on = [run(1.0, 1000), run(3.0, 1000), run(1.1, 1000), run(9.0, 10, "not started")]
    off = [run(1.0, 1000), run(1.0, 1000), run(1.0, 1000), run(1.0, 1000)]
    ratios = round_ratios(on, off)
    assert ratios == pytest.approx([1.0, 3.0, 1.1])
    assert statistics.median(ratios) == pytest.approx(1.1)


def test_the_real_vllm_prefix_scenario_grades_ours_against_chash_and_the_cache_aware_peers() -> (
    None
):
    """Scenario 12's table and targets from runs: hit rates as a share of the best possible
    (every request to one replica), each of our routers against each peer."""
    record = RequestRecord(0, True, 16, 0.0, 0.05, 0.2, 16, 200, "", "")

    def run(key: str, hits: float, unavailable: str = "") -> PeerRun:
        extra = {"cache_hits": hits, "cache_queries": 100.0}
        return PeerRun(key, key, extra=extra, records=[record] * 4, unavailable=unavailable)

    runs = [
        run("direct", 80.0),
        run("sglang-ca", 70.0),
        run("vllm-ca", 0.0, unavailable="not installed"),
        run("ours-cost", 77.0),
        run("ours-cost-precise", 60.0),
    ]
    table = real_prefix_table(runs)
    assert [row[3:5] for row in table.rows if not row[1].startswith("not")] == [
        ["80%", "100%"], ["70%", "87%"], ["77%", "96%"], ["60%", "75%"],
    ]  # fmt: skip
    checks = {t.text: t.met for t in real_prefix_targets(runs)}
    assert checks == {
        "ours-cost: hit rate >= 95 % of the best possible": True,
        "ours-cost: hit rate >= sglang-ca's": True,
        "ours-cost: hit rate >= vllm-ca's": None,
        "ours-cost-precise: hit rate >= 95 % of the best possible": False,
        "ours-cost-precise: hit rate >= sglang-ca's": False,
        "ours-cost-precise: hit rate >= vllm-ca's": None,
    }


def test_the_precise_peer_starts_our_router_as_up_does() -> None:
    """`ours-cost-precise` is the router `vllm-fleet up` starts: --kv-events auto."""
    peer = make_peer("ours-cost-precise", Path("/unused"), "python")
    assert isinstance(peer, OursPeer) and peer.kv_events
    assert "--kv-events auto" in peer.settings
