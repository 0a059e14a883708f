"""Precise prefix matching: what a replica whose KV events this router follows holds of a
request, block by block, by vLLM's own hashes (no I/O but the replica's model list).

vllm_fleet.router.kv_events keeps each subscribed replica's block set as a LiveBlockSet;
vllm_fleet.router.prompt_tokens computes a request's vLLM block hashes (PromptBlocks) with the
model's tokenizer; the balancer asks cached_prefix_tokens, which answers from the block set
where the replica's events are live and its hashes are the router's, and from the approximate
index (vllm_fleet.router.prefix_index) elsewhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from vllm_fleet.router.block_hashes import PromptBlocks, external_hash, none_hash, sha256_pickle
from vllm_fleet.router.bounded_read import fetch_json
from vllm_fleet.router.prefix_index import KvBlockSet
from vllm_fleet.router.state import ReplicaState

log = logging.getLogger("vllm_fleet.router")

#: GET /v1/models of a subscribed replica (model roots and LoRA paths), its timeout and cap.
MODELS_TIMEOUT_S = 2.0
MAX_MODELS_BYTES = 1 << 20
#: The token ids check: a precisely matched request's first uncached block must show up in the
#: replica's BlockStored events (or its block set) within CONFIRM_S; after MIN_UNCONFIRMED
#: misses and no confirmation at all, the router's rendering of the prompt is not vLLM's (a
#: chat template it does not reproduce) and the replica is matched approximately. At most
#: MAX_EXPECTED blocks are awaited at once.
CONFIRM_S = 30.0
MIN_UNCONFIRMED = 8
MAX_EXPECTED = 64
#: Blocks a request was sent to compute count as held by its replica until its BlockStored
#: event arrives, for at most PENDING_S (a prompt's blocks are stored once its prefill ends:
#: its wait in the queue plus its prefill); at most MAX_PENDING per replica, oldest dropped.
PENDING_S = 10.0
MAX_PENDING = 65_536


@dataclass
class ModelCard:
    """One entry of a replica's GET /v1/models: where its tokenizer comes from (``root``: the
    ``--model`` path or Hugging Face id; a LoRA adapter's path) and, for an adapter, the base
    model it runs on."""

    root: str
    parent: str | None = None


@dataclass
class LiveBlockSet(KvBlockSet):
    """The block set of a replica this router is subscribed to, with what precise matching
    needs besides the hashes: the replica's models, and whether its hashes are the router's."""

    models: dict[str, ModelCard] = field(default_factory=dict)
    #: The replica's root-block hashes equal the router's (True), differ (False: another
    #: hash algorithm or seed, matched approximately), or were not seen yet (None).
    hashes_match: bool | None = None
    #: Requests sent here with a precise prediction, and the prompt tokens it said were cached
    #: (comparable with the replica's vllm:prefix_cache_hits).
    precise_requests: int = 0
    precise_cached_tokens: int = 0
    #: The token ids check (CONFIRM_S): blocks awaited (hash -> monotonic time sent), how many
    #: showed up and how many did not; ``ids_match`` False once the check failed.
    expected: dict[int, float] = field(default_factory=dict, repr=False)
    ids_confirmed: int = 0
    ids_unconfirmed: int = 0
    ids_match: bool | None = None
    #: Blocks sent to be computed here and not stored yet (hash -> monotonic time sent):
    #: matched as held. Without them the next request of a prefix whose first request is
    #: still in prefill (or whose BlockStored is still on its way) found no replica holding
    #: it, while the approximate record, written at sending, did.
    pending: dict[int | bytes, float] = field(default_factory=dict, repr=False)
    #: When a request was last sent here without its block hashes (the tokenizer still
    #: loading, or busy): its blocks are in no pending set, only in the approximate record.
    unhashed_at: float = -1e9
    #: False while the subscriber reads the replica's history (vllm_fleet.router.kv_replay):
    #: until then the set lacks what was cached before, so the replica is matched
    #: approximately.
    synced: bool = True

    def __contains__(self, block_hash: object) -> bool:
        """Held: stored, or sent to be computed here within PENDING_S."""
        return block_hash in self.hashes or block_hash in self.pending

    def expire(self, now: float) -> None:
        """Forget pending blocks sent more than PENDING_S ago (their request failed, or was
        cancelled before its prefill ended)."""
        pending = self.pending
        while pending:
            oldest, at = next(iter(pending.items()))
            if now - at <= PENDING_S:
                return
            del pending[oldest]

    def send(self, hashes: Sequence[int | bytes], now: float) -> None:
        """A request will compute ``hashes`` here."""
        pending = self.pending
        for block_hash in hashes:
            if block_hash not in self.hashes:
                pending.pop(block_hash, None)  # re-sent: its time starts again
                pending[block_hash] = now
        while len(pending) > MAX_PENDING:
            del pending[next(iter(pending))]

    def expect(self, block_hash: int, now: float, url: str) -> None:
        """A request was sent that will store ``block_hash`` here if the router's token ids
        are vLLM's; blocks awaited longer than CONFIRM_S are settled first."""
        expected = self.expected
        while expected:
            oldest, at = next(iter(expected.items()))
            if now - at <= CONFIRM_S:
                break
            del expected[oldest]
            if oldest in self.hashes:  # stored by another request meanwhile
                self.ids_confirmed += 1
            else:
                self.ids_unconfirmed += 1
        if len(expected) < MAX_EXPECTED:
            expected[block_hash] = now
        failed = self.ids_unconfirmed >= MIN_UNCONFIRMED and self.ids_confirmed == 0
        if failed and self.ids_match is None:
            self.ids_match = False
            log.warning(
                "precise prefix matching off for url=%s: the blocks its requests should have "
                "stored never appeared (the router renders or tokenizes prompts differently "
                "from the replica); its requests are matched approximately",
                url,
            )

    def confirm(self, hashes: Sequence[int | bytes]) -> None:
        """BlockStored: the awaited blocks among ``hashes`` are confirmed, and no longer
        pending."""
        pending, expected = self.pending, self.expected
        if pending:
            for block_hash in hashes:
                pending.pop(block_hash, None)
        if not expected:
            return
        for block_hash in hashes:
            if isinstance(block_hash, int) and expected.pop(block_hash, None) is not None:
                self.ids_confirmed += 1
                self.ids_match = True

    def check_root(self, published: int | bytes, tokens: tuple[int, ...], url: str) -> None:
        """Compare a root block's published hash with the router's hash of its tokens."""
        if self.hashes_match is not None:
            return
        ours = external_hash(sha256_pickle((none_hash(), tokens, None)))
        self.hashes_match = published == ours
        if not self.hashes_match:
            log.warning(
                "kv events: url=%s publishes block hashes other than vLLM's default (sha256, "
                "seed 'vllm-none-hash', 64-bit ints); its requests are matched approximately. "
                "Start it with --prefix-caching-hash-algo sha256, without PYTHONHASHSEED and "
                "without VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0",
                url,
            )


def base_card(cards: Mapping[str, ModelCard], card: ModelCard) -> ModelCard | None:
    """The card whose tokenizer ``card``'s model uses: its own, or a LoRA adapter's base
    model's (None when the replica does not list the base)."""
    return card if card.parent is None else cards.get(card.parent)


def live_events(replica: ReplicaState) -> LiveBlockSet | None:
    """The replica's block set when this router follows its events, has read its history and
    can match its hashes."""
    events = replica.prefixes.events
    if (
        isinstance(events, LiveBlockSet)
        and events.synced
        and False not in (events.hashes_match, events.ids_match)
    ):
        return events
    return None


def _precise_hit(replica: ReplicaState, blocks: PromptBlocks) -> int | None:
    """Prompt tokens of ``blocks`` the replica holds or is computing (None: not live)."""
    events = live_events(replica)
    if events is None:
        return None
    size = events.block_size or replica.prefixes.block_tokens
    if size <= 0:
        return None
    if events.pending:
        events.expire(time.monotonic())
    return blocks.cached_tokens(size, events)


def cached_prefix_tokens(
    replica: ReplicaState,
    prefix: Sequence[int],
    blocks: PromptBlocks | None,
    prompt_tokens: float,
) -> float:
    """Prompt tokens ``replica`` is expected to skip, in the router's estimated tokens (body
    bytes / 4, what ``prompt_tokens`` counts): the precise prediction where the replica's
    events are live and the request's vLLM block hashes are known (the cached share of the
    real prompt, times ``prompt_tokens``), the approximate index's elsewhere."""
    if blocks is not None and blocks.tokens > 0:
        hit = _precise_hit(replica, blocks)
        if hit is not None:
            precise = prompt_tokens * hit / blocks.tokens
            events = replica.prefixes.events
            assert isinstance(events, LiveBlockSet)  # _precise_hit answered from it
            if prefix and time.monotonic() - events.unhashed_at < PENDING_S:
                # a request went here unhashed lately: what it will store is only in the
                # approximate record (one turn of a conversation sent while the tokenizer
                # loaded, say, and the next sent before its prefill ended)
                return max(precise, replica.prefixes.cached_tokens(prefix))
            return precise
    return replica.prefixes.cached_tokens(prefix) if prefix else 0.0


def note_sent(replica: ReplicaState, blocks: PromptBlocks | None) -> None:
    """Count a precise prediction for a request sent to ``replica`` (for /fleet/replicas),
    and keep the blocks it will store pending; note a request sent without hashes."""
    if blocks is None:
        events = replica.prefixes.events
        if isinstance(events, LiveBlockSet):
            events.unhashed_at = time.monotonic()
        return
    hit = _precise_hit(replica, blocks)
    events = replica.prefixes.events
    if hit is None or not isinstance(events, LiveBlockSet):
        return
    events.precise_requests += 1
    events.precise_cached_tokens += hit
    size = events.block_size or replica.prefixes.block_tokens
    hashes = blocks.hashes.get(size, ())
    first = hit // size  # the first block the replica computes, unless it holds it already
    now = time.monotonic()
    if first < len(hashes) and hashes[first] not in events.hashes:
        events.expect(hashes[first], now, replica.url)
    events.send(hashes[first:], now)


def live_view(
    events: KvBlockSet,
    tokenizer_states: Callable[[Mapping[str, ModelCard]], dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The precise-matching fields of a block set, for /fleet/replicas; ``tokenizer_states``
    (vllm_fleet.router.prompt_tokens.PromptTokenizers.states) names its models' tokenizers'."""
    if not isinstance(events, LiveBlockSet):
        return {}
    return {
        "synced": events.synced,
        "hashes_match": events.hashes_match,
        "pending_blocks": len(events.pending),
        "precise_requests": events.precise_requests,
        "precise_cached_tokens": events.precise_cached_tokens,
        "ids_match": events.ids_match,
        "ids_confirmed": events.ids_confirmed,
        "ids_unconfirmed": events.ids_unconfirmed,
        "tokenizers": tokenizer_states(events.models) if tokenizer_states is not None else {},
    }


def models_from(payload: Any) -> dict[str, ModelCard]:
    """Model cards (id -> root, parent) from a GET /v1/models answer; entries without an id or
    root are left out."""
    data = payload.get("data") if isinstance(payload, dict) else None
    cards: dict[str, ModelCard] = {}
    for entry in data if isinstance(data, list) else ():
        if not isinstance(entry, dict):
            continue
        model, root, parent = entry.get("id"), entry.get("root"), entry.get("parent")
        if isinstance(model, str) and isinstance(root, str) and root:
            cards[model] = ModelCard(root, parent if isinstance(parent, str) else None)
    return cards


async def fetch_models(
    session: aiohttp.ClientSession, replica_url: str, timeout_s: float = MODELS_TIMEOUT_S
) -> dict[str, ModelCard] | None:
    """The replica's model cards; None when it cannot say now."""
    payload = await fetch_json(session, f"{replica_url}/v1/models", timeout_s, MAX_MODELS_BYTES)
    if payload is None:
        return None
    return models_from(payload)
