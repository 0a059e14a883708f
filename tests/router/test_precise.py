"""Precise prefix matching: vLLM's block hashes (block_hashes), the request's token ids with
the model's tokenizer (prompt_tokens), and the lookup in a replica's live block set (precise).
Against real vLLM: tests/e2e/test_prefix_vllm.py."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import pytest

from vllm_fleet.launcher.sim.kv_events import KVEventBatch, to_wire
from vllm_fleet.launcher.sim.kvcache import BlockPool
from vllm_fleet.launcher.sim.tokens import block_hashes as sim_block_hashes
from vllm_fleet.launcher.tiny_model import build_tiny_model
from vllm_fleet.router.balancer import CostAware, RequestInfo
from vllm_fleet.router.block_hashes import (
    PromptBlocks,
    block_hashes,
    external_hash,
    leading_hits,
    prompt_blocks,
)
from vllm_fleet.router.kv_batches import apply_batch, decode_batch
from vllm_fleet.router.precise import (
    CONFIRM_S,
    MIN_UNCONFIRMED,
    PENDING_S,
    LiveBlockSet,
    ModelCard,
    cached_prefix_tokens,
    live_events,
    models_from,
    note_sent,
)
from vllm_fleet.router.prompt_tokens import (
    MAX_PENDING,
    RETRY_LOAD_S,
    PromptTokenizers,
    token_ids,
)
from vllm_fleet.router.state import Fleet, ReplicaState

# --- vLLM's hashes ----------------------------------------------------------------------------

#: First-block hashes of ids 0..15 computed with vLLM 0.32's own hash_block_tokens(sha256, ...)
#: after init_none_hash(sha256): plain, LoRA ("ad", "/p/ad"), cache_salt "s1".
VLLM_PLAIN = 3262291359910021016
VLLM_LORA = 6707228203778193312
VLLM_SALT = 7027321370956117732


def test_hashes_are_vllms_with_lora_and_cache_salt_keys() -> None:
    ids = list(range(40))
    assert external_hash(block_hashes(ids, 16)[0]) == VLLM_PLAIN
    assert external_hash(block_hashes(ids, 16, lora=("ad", "/p/ad"))[0]) == VLLM_LORA
    salted = block_hashes(ids, 16, cache_salt="s1")
    assert external_hash(salted[0]) == VLLM_SALT
    assert len(salted) == 2  # full blocks only
    # the salt keys block 0 only, but every later block chains from it
    assert salted[1] != block_hashes(ids, 16)[1]
    assert sim_block_hashes(ids, 16) == block_hashes(ids, 16)  # the simulator's are these


def test_the_leading_run_stops_at_the_first_miss_and_spares_the_last_token() -> None:
    assert leading_hits([1, 2, 3], {1, 3}) == 1
    ids = list(range(48))
    blocks = prompt_blocks(ids, [16, 0])
    held = set(blocks.hashes[16])
    assert set(blocks.hashes) == {16}
    # 48 tokens = 3 full blocks, but vLLM computes the last token: at most 2 blocks hit
    assert blocks.cached_tokens(16, held) == 32
    assert prompt_blocks([*ids, 48], [16]).cached_tokens(16, held) == 48
    assert blocks.cached_tokens(128, held) is None  # not computed for that block size


# --- token ids ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer  # the test extra's vLLM brings it (heavy import)

    path = build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama")
    return AutoTokenizer.from_pretrained(str(path))


def test_chat_ids_are_the_templates_and_unreproduced_requests_give_none(
    tiny_tokenizer: Any,
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = tiny_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert token_ids(tiny_tokenizer, {"messages": messages}) == expected
    assert tiny_tokenizer.decode(expected).endswith("<|assistant|>\n")
    for payload in (
        {"messages": messages, "tools": [{"type": "function"}]},
        {"messages": messages, "chat_template": "{{ 1 }}"},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
        {"messages": [{"role": "user", "content": "x", "name": "n"}]},
        {"messages": messages, "add_special_tokens": True},
    ):
        assert token_ids(tiny_tokenizer, payload) is None
    with_bos = token_ids(tiny_tokenizer, {"prompt": "Hello"})
    without = token_ids(tiny_tokenizer, {"prompt": ["Hello"], "add_special_tokens": False})
    assert with_bos is not None and without is not None
    assert with_bos[-len(without) :] == without
    assert token_ids(tiny_tokenizer, {"prompt": [5, 6, 7]}) == [5, 6, 7]


# --- the lookup -----------------------------------------------------------------------------


def live_replica(url: str, held: Sequence[int] = (), block_size: int = 16) -> ReplicaState:
    replica = ReplicaState(url=url, healthy=True, models=frozenset({"m", "ad"}))
    events = LiveBlockSet(block_size=block_size)
    events.hashes.update(held)
    events.models = {"m": ModelCard("/models/m"), "ad": ModelCard("/adapters/ad", parent="m")}
    replica.prefixes.events = events
    return replica


def test_live_replicas_answer_by_blocks_and_the_rest_approximately() -> None:
    ids = list(range(65))
    blocks = prompt_blocks(ids, [16])
    holder = live_replica("http://a", blocks.hashes[16][:2])
    empty = live_replica("http://b")
    approximate = ReplicaState(url="http://c")
    keys = (11, 12, 13)
    approximate.prefixes.record(keys, 0.0)
    # 2 of the prompt's 65 real tokens' blocks = 32 tokens; in the router's estimated units
    assert cached_prefix_tokens(holder, keys, blocks, 130) == pytest.approx(130 * 32 / 65)
    assert cached_prefix_tokens(empty, keys, blocks, 130) == 0.0
    assert cached_prefix_tokens(approximate, keys, blocks, 130) > 0  # its record
    assert cached_prefix_tokens(holder, keys, None, 130) == 0.0  # no hashes: approximate
    note_sent(holder, blocks)
    events = holder.prefixes.events
    assert isinstance(events, LiveBlockSet)
    assert (events.precise_requests, events.precise_cached_tokens) == (1, 32)
    events.hashes_match = False  # another hash algorithm: approximate
    assert live_events(holder) is None
    assert cached_prefix_tokens(holder, (), blocks, 130) == 0.0


def test_the_cost_policy_sends_a_prompt_where_its_blocks_are() -> None:
    ids = list(range(200))
    blocks = prompt_blocks(ids, [16])
    replicas = [live_replica(f"http://r{i}") for i in range(3)]
    assert isinstance(replicas[2].prefixes.events, LiveBlockSet)
    replicas[2].prefixes.events.hashes.update(blocks.hashes[16])
    request = RequestInfo(model="m", prompt_tokens=200, max_tokens=8, prefix=(1,), blocks=blocks)
    picks = {CostAware().pick(replicas, request).url for _ in range(20)}
    assert picks == {"http://r2"}


def test_root_blocks_show_whether_the_replica_hashes_as_the_router_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Events as the simulator puts them on the wire (vLLM 0.32's encoding)."""
    pool = BlockPool(num_blocks=8, block_size=16, record_events=True)
    ids = list(range(32))
    hashes = sim_block_hashes(ids, 16)
    blocks = pool.take([], 2)
    pool.register(blocks, hashes, ids, 0, 2)
    payload = msgspec.msgpack.encode(
        KVEventBatch(ts=0.0, events=[to_wire(e) for e in pool.take_events()])
    )
    same = live_replica("http://same")
    apply_batch(same, 0, decode_batch(payload))
    assert isinstance(same.prefixes.events, LiveBlockSet)
    assert same.prefixes.events.hashes_match is True
    assert same.prefixes.events.hashes == {external_hash(h) for h in hashes}
    other = live_replica("http://other")
    forged = msgspec.msgpack.encode(
        [0.0, [["BlockStored", [123], None, ids[:16], 16, None, "GPU"]], 0]
    )
    with caplog.at_level(logging.WARNING, logger="vllm_fleet.router"):
        apply_batch(other, 0, decode_batch(forged))
    assert isinstance(other.prefixes.events, LiveBlockSet)
    assert other.prefixes.events.hashes_match is False
    assert "matched approximately" in caplog.text


def test_model_cards_give_roots_and_lora_parents() -> None:
    answer = {
        "data": [
            {"id": "m", "root": "/models/m", "parent": None},
            {"id": "ad", "root": "/adapters/ad", "parent": "m"},
            {"id": "broken"},
            "junk",
        ]
    }
    assert models_from(answer) == {
        "m": ModelCard("/models/m"),
        "ad": ModelCard("/adapters/ad", "m"),
    }
    assert models_from([]) == {}


# --- the tokenizer thread -------------------------------------------------------------------


class WordTokenizer:
    """A stand-in tokenizer: one id per character, the chat rendered as role: content."""

    def apply_chat_template(self, messages: list[Mapping[str, str]], **_: Any) -> list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return [ord(c) for c in text]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


async def test_attach_hashes_the_request_for_live_replicas_with_the_models_tokenizer() -> None:
    loaded: list[str] = []

    def loader(root: str) -> Any:
        loaded.append(root)
        return WordTokenizer() if root == "/models/m" else None

    tokenizers = PromptTokenizers(loader)
    fleet = Fleet()
    fleet.replicas["http://a"] = live_replica("http://a", block_size=16)
    fleet.replicas["http://b"] = live_replica("http://b", block_size=32)
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 100 + b'"}]}'
    info = RequestInfo(model="m", prompt_tokens=30, prefix=(1,))
    try:
        assert (await tokenizers.attach(fleet, info, body)).blocks is None  # still loading
        assert await tokenizers.wait_loaded("/models/m")
        attached = await tokenizers.attach(fleet, info, body)
        ids = [ord(c) for c in "user: " + "x" * 100 + "\n"]
        assert attached.blocks == prompt_blocks(ids, [16, 32])
        # a LoRA adapter: the base model's tokenizer, the adapter's name and path in the key
        lora = await tokenizers.attach(fleet, RequestInfo(model="ad", prefix=(1,)), body)
        assert lora.blocks == prompt_blocks(ids, [16, 32], lora=("ad", "/adapters/ad"))
        # a replica without live events, or a model without a loadable tokenizer: unchanged
        fleet.replicas["http://a"].prefixes.events = None
        fleet.replicas["http://b"].prefixes.events = None
        assert await tokenizers.attach(fleet, info, body) is info
        assert loaded == ["/models/m"]  # loaded once
        tokenizers.pending = MAX_PENDING  # a burst: the request keeps the approximate index
        fleet.replicas["http://a"] = live_replica("http://a")
        assert await tokenizers.attach(fleet, info, body) is info
        assert tokenizers.skipped_busy == 1
    finally:
        tokenizers.close()


async def test_a_replicas_model_cards_start_their_tokenizers_loading() -> None:
    """The subscriber hands each replica's models over as it reads them (preload): the
    tokenizer loads before the first request needs it; an adapter's is its base model's."""
    loaded: list[str] = []

    def loader(root: str) -> Any:
        loaded.append(root)
        return WordTokenizer()

    tokenizers = PromptTokenizers(loader)
    cards = {
        "m": ModelCard("/models/m"),
        "ad": ModelCard("/adapters/ad", parent="m"),
        "orphan": ModelCard("/adapters/o", parent="gone"),
    }
    try:
        assert tokenizers.states(cards)["m"] == "not asked"
        tokenizers.preload(cards)
        assert tokenizers.states(cards)["ad"] == "loading"  # the thread runs the loader
        assert await tokenizers.wait_loaded("/models/m")
        tokenizers.preload(cards)  # read again later: nothing loads twice
        assert loaded == ["/models/m"]
        assert tokenizers.states(cards) == {
            "m": "loaded",
            "ad": "loaded",
            "orphan": "no base model",
        }
    finally:
        tokenizers.close()
    failing = PromptTokenizers(lambda root: None)
    try:
        assert not await failing.wait_loaded("/models/m")
        assert failing.states({"m": ModelCard("/models/m")}) == {"m": "failed"}
    finally:
        failing.close()


async def test_a_tokenizer_that_does_not_load_leaves_requests_approximate() -> None:
    tokenizers = PromptTokenizers(lambda root: None)
    fleet = Fleet()
    fleet.replicas["http://a"] = live_replica("http://a")
    info = RequestInfo(model="m", prefix=(1,))
    try:
        assert not await tokenizers.wait_loaded("/models/m")
        assert await tokenizers.attach(fleet, info, b'{"prompt": "hello"}') is info
    finally:
        tokenizers.close()


async def test_a_tokenizer_that_failed_to_load_is_tried_again_later() -> None:
    """A load that failed (the Hub unreachable a moment, a model directory not there yet) does
    not turn precise matching off for good: the next request after RETRY_LOAD_S tries again."""
    attempts: list[str] = []
    now = [100.0]

    def loader(root: str) -> Any:
        attempts.append(root)
        return WordTokenizer() if len(attempts) > 1 else None

    tokenizers = PromptTokenizers(loader, clock=lambda: now[0])
    try:
        assert not await tokenizers.wait_loaded("/models/m")
        now[0] += RETRY_LOAD_S - 1
        assert tokenizers.tokenizer("/models/m") is None
        assert attempts == ["/models/m"]  # not yet: no load per request while it fails
        now[0] += 2
        assert await tokenizers.wait_loaded("/models/m")
        assert attempts == ["/models/m", "/models/m"]
        assert tokenizers.tokenizer("/models/m") is not None
    finally:
        tokenizers.close()


def test_prompt_blocks_are_plain_data() -> None:
    assert PromptBlocks(tokens=3) == PromptBlocks(tokens=3, hashes={})


def test_blocks_a_request_should_store_confirm_the_token_ids_or_turn_matching_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first uncached block of each precisely matched request must appear in the
    replica's BlockStored events: once one does, the ids are vLLM's; never after
    MIN_UNCONFIRMED misses, and the replica is matched approximately."""
    blocks = prompt_blocks(list(range(64)), [16])
    good = live_replica("http://good")
    note_sent(good, blocks)
    events = good.prefixes.events
    assert isinstance(events, LiveBlockSet)
    assert list(events.expected) == [blocks.hashes[16][0]]
    payload = msgspec.msgpack.encode(
        [0.0, [["BlockStored", list(blocks.hashes[16]), None, [], 16, None, "GPU"]], 0]
    )
    apply_batch(good, 0, decode_batch(payload))
    assert (events.ids_confirmed, events.ids_match, events.expected) == (1, True, {})
    note_sent(good, blocks)  # all cached now but the last token's block: nothing awaited
    assert events.expected == {}

    bad = live_replica("http://bad")
    events = bad.prefixes.events
    assert isinstance(events, LiveBlockSet)
    with caplog.at_level(logging.WARNING, logger="vllm_fleet.router"):
        for i in range(MIN_UNCONFIRMED):
            events.expect(i, float(i), bad.url)
        events.expect(99, CONFIRM_S + MIN_UNCONFIRMED, bad.url)  # settles the 8 old ones
    assert (events.ids_confirmed, events.ids_unconfirmed) == (0, MIN_UNCONFIRMED)
    assert events.ids_match is False
    assert live_events(bad) is None
    assert "never appeared" in caplog.text


def test_blocks_sent_to_be_computed_count_as_held_until_stored_or_expired(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prefix's second request, sent while the first is still in prefill (no BlockStored
    yet), goes where the first went: its blocks are pending there. They stay held once
    stored, and stop counting PENDING_S after sending when no event came."""
    clock = [1000.0]
    monkeypatch.setattr("vllm_fleet.router.precise.time.monotonic", lambda: clock[0])
    blocks = prompt_blocks(list(range(200)), [16])
    replicas = [live_replica(f"http://r{i}") for i in range(3)]
    request = RequestInfo(model="m", prompt_tokens=200, max_tokens=8, prefix=(1,), blocks=blocks)
    policy = CostAware()
    first = policy.pick(replicas, request)
    note_sent(first, blocks)
    events = first.prefixes.events
    assert isinstance(events, LiveBlockSet)
    assert len(events.pending) == len(blocks.hashes[16])
    assert cached_prefix_tokens(first, (1,), blocks, 200) == 192  # 12 of 12 usable blocks
    assert all(cached_prefix_tokens(r, (1,), blocks, 200) == 0 for r in replicas if r is not first)
    assert {policy.pick(replicas, request).url for _ in range(20)} == {first.url}
    # stored: no longer pending, still held
    payload = msgspec.msgpack.encode(
        [0.0, [["BlockStored", list(blocks.hashes[16][:6]), None, [], 16, None, "GPU"]], 0]
    )
    apply_batch(first, 0, decode_batch(payload))
    assert len(events.pending) == len(blocks.hashes[16]) - 6
    assert cached_prefix_tokens(first, (1,), blocks, 200) == 192
    # the rest never came (the request failed): after PENDING_S only the stored six count
    clock[0] += PENDING_S + 1
    assert cached_prefix_tokens(first, (1,), blocks, 200) == 96
    assert events.pending == {}


def test_a_replica_is_matched_approximately_while_its_history_is_read() -> None:
    """Until the subscriber has read the replay socket, the block set lacks what the replica
    cached before: an empty set must not outvote the approximate record."""
    blocks = prompt_blocks(list(range(65)), [16])
    replica = live_replica("http://a")
    keys = (11, 12, 13)
    replica.prefixes.record(keys, 0.0)
    events = replica.prefixes.events
    assert isinstance(events, LiveBlockSet)
    events.synced = False
    assert live_events(replica) is None
    assert cached_prefix_tokens(replica, keys, blocks, 130) > 0  # the record's
    events.synced = True
    assert cached_prefix_tokens(replica, keys, blocks, 130) == 0.0  # the (empty) block set


def test_a_request_sent_without_hashes_leaves_the_approximate_record_in_the_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request sent while the tokenizer loaded (no hashes, no pending blocks) will store its
    prefix all the same: for PENDING_S the replica is matched by the larger of its block set
    and its approximate record, so the next request of that prefix follows it."""
    clock = [1000.0]
    monkeypatch.setattr("vllm_fleet.router.precise.time.monotonic", lambda: clock[0])
    blocks = prompt_blocks(list(range(200)), [16])
    replica = live_replica("http://a")
    keys = (11, 12, 13)
    replica.prefixes.record(keys, clock[0])
    note_sent(replica, None)  # the unhashed request
    approximate = replica.prefixes.cached_tokens(keys)
    assert approximate > 0
    assert cached_prefix_tokens(replica, keys, blocks, 200) == approximate
    clock[0] += PENDING_S + 1  # its blocks have been stored (or never will be) by now
    assert cached_prefix_tokens(replica, keys, blocks, 200) == 0.0
