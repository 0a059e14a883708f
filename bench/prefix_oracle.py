"""The best prefix-cache hit rate a request sequence allows, to grade the routers' hit rates.

A router's hit rate means little alone: a sequence of fresh groups cannot hit, and one group
sent a thousand times hits almost always. So each scenario reports the hit rate of an oracle
fleet on the same sequence: the replicas' caches pooled into one LRU of their total size, every
request's prompt blocks cached the moment it is sent, no room taken by running requests. No
router over the real replicas can do better than that (short of beating LRU by knowing the
future); what is left is each group's first request and what LRU evicts from the pooled size.

Blocks are counted the simulator's way (launcher.sim.tokens: 4 bytes a token, the chat
template, `block_size`-token blocks) and a hit the way vLLM counts it
(`vllm:prefix_cache_hits_total / queries_total`, tokens): the longest cached run of leading
full blocks, never the last prompt token, over every prompt token sent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from bench.load import RequestSpec
from launcher.sim.tokens import chat_token_ids


def prompt_ids(spec: RequestSpec) -> list[int]:
    """The prompt's token ids as the simulator makes them from the chat the request sends."""
    return chat_token_ids(spec.messages or (("user", spec.prompt),))


def best_hit_rate(schedule: Sequence[RequestSpec], block_size: int, capacity_blocks: int) -> float:
    """Hit tokens / prompt tokens of the pooled-LRU oracle over `schedule` (in sending order)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = queries = 0
    for spec in sorted(schedule, key=lambda s: s.at):
        ids = prompt_ids(spec)
        keys: list[int] = []
        parent = 0
        for start in range(0, len(ids) - block_size + 1, block_size):
            parent = hash((parent, tuple(ids[start : start + block_size])))
            keys.append(parent)
        hittable = (len(ids) - 1) // block_size
        found = 0
        while found < min(hittable, len(keys)) and keys[found] in cache:
            found += 1
        hits += found * block_size
        queries += len(ids)
        # Last block first, as vLLM frees a request's blocks: a prefix is evicted from its
        # tail, and its head (shared by more requests) stays longest.
        for key in reversed(keys):
            cache[key] = None
            cache.move_to_end(key)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
    return hits / queries if queries else 0.0
