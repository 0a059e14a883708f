"""Precise prefix matching: what a replica whose KV events this router follows holds of a
request, block by block, by vLLM's own hashes (no I/O but the replica's model list).

vllm_fleet.router.kv_events keeps each subscribed replica's block set as a LiveBlockSet;
vllm_fleet.router.prompt_tokens computes a request's vLLM block hashes (PromptBlocks) with the
model's tokenizer; the balancer asks cached_prefix_tokens, which answers from the block set
where the replica's events are live and its hashes are the router's, and from the approximate
index (vllm_fleet.router.prefix_index) elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from vllm_fleet.router.block_hashes import PromptBlocks, external_hash, none_hash, sha256_pickle
from vllm_fleet.router.bounded_read import read_capped
from vllm_fleet.router.prefix_index import KvBlockSet
from vllm_fleet.router.state import ReplicaState

log = logging.getLogger("vllm_fleet.router")

#: GET /v1/models of a subscribed replica (model roots and LoRA paths), its timeout and cap.
MODELS_TIMEOUT_S = 2.0
MAX_MODELS_BYTES = 1 << 20


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


def live_events(replica: ReplicaState) -> LiveBlockSet | None:
    """The replica's block set when this router follows its events and can match its hashes."""
    events = replica.prefixes.events
    if isinstance(events, LiveBlockSet) and events.hashes_match is not False:
        return events
    return None


def _precise_hit(replica: ReplicaState, blocks: PromptBlocks) -> int | None:
    events = live_events(replica)
    if events is None:
        return None
    size = events.block_size or replica.prefixes.block_tokens
    return blocks.cached_tokens(size, events.hashes) if size > 0 else None


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
            return prompt_tokens * hit / blocks.tokens
    return replica.prefixes.cached_tokens(prefix) if prefix else 0.0


def note_sent(replica: ReplicaState, blocks: PromptBlocks | None) -> None:
    """Count a precise prediction for a request sent to ``replica`` (for /fleet/replicas)."""
    if blocks is None:
        return
    hit = _precise_hit(replica, blocks)
    events = replica.prefixes.events
    if hit is not None and isinstance(events, LiveBlockSet):
        events.precise_requests += 1
        events.precise_cached_tokens += hit


def live_view(events: KvBlockSet) -> dict[str, Any]:
    """The precise-matching fields of a block set, for /fleet/replicas."""
    if not isinstance(events, LiveBlockSet):
        return {}
    return {
        "hashes_match": events.hashes_match,
        "precise_requests": events.precise_requests,
        "precise_cached_tokens": events.precise_cached_tokens,
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
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        url = f"{replica_url}/v1/models"
        async with session.get(url, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                return None
            payload = json.loads(await read_capped(resp, MAX_MODELS_BYTES))
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None
    return models_from(payload)
