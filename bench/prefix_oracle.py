"""The best prefix-cache hit rate a request sequence allows, to grade the routers' hit rates.

A router's hit rate means little alone: a sequence of fresh groups cannot hit, and one group
sent a thousand times hits almost always. So each scenario reports the hit rate of an oracle
fleet on the same sequence: the replicas' caches pooled into one LRU of their total size, every
request's prompt blocks cached the moment it is sent, no room taken by running requests. No
router over the real replicas can do better than that (short of beating LRU by knowing the
future); what is left is each group's first request and what LRU evicts from the pooled size.

Tokens are the simulator's own (its request parser, vllm_fleet.launcher.sim.protocol.parse_chat: 4
bytes a token, the chat template), and so is the reply (its filler words, fixed by the prompt); a
request leaves its prompt and all but the last generated token cached, in `block_size`-token
blocks, as vLLM does. A hit is counted the way vLLM counts it
(`vllm:prefix_cache_hits_total / queries_total`, tokens): the longest cached run of leading
full blocks, never the last prompt token, over every prompt token sent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from bench.load import RequestSpec, request_body
from vllm_fleet.launcher.sim.config import SimConfig
from vllm_fleet.launcher.sim.protocol import GenerationRequest, filler_text, parse_chat
from vllm_fleet.launcher.sim.tokens import text_token_ids

#: A simulator configuration that accepts any prompt (only its parser is used here).
_PARSER = SimConfig(model="sim-model", max_model_len=1 << 20, kv_cache_tokens=1 << 20)


def simulated(messages: Sequence[tuple[str, str]], max_tokens: int) -> GenerationRequest:
    """What the simulator makes of a chat request: its prompt ids and reply offset."""
    body = request_body(RequestSpec(0, 0.0, "", max_tokens, False, tuple(messages)), "sim-model")
    body["model"] = _PARSER.model
    return parse_chat(body, _PARSER)


def reply_text(messages: Sequence[tuple[str, str]], max_tokens: int) -> str:
    """The answer a simulated replica gives this chat (the same on every replica): what a
    client keeps and sends back in the next turn."""
    return filler_text(simulated(messages, max_tokens).text_offset, max_tokens)


def _chat(spec: RequestSpec) -> tuple[tuple[str, str], ...]:
    return spec.messages or (("user", spec.prompt),)


def prompt_ids(spec: RequestSpec) -> list[int]:
    """The prompt's token ids as the simulator makes them from the chat the request sends."""
    return list(simulated(_chat(spec), spec.max_tokens or 1).prompt_token_ids)


def best_hit_rate(schedule: Sequence[RequestSpec], block_size: int, capacity_blocks: int) -> float:
    """Hit tokens / prompt tokens of the pooled-LRU oracle over `schedule` (in sending order)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = queries = 0
    for spec in sorted(schedule, key=lambda s: s.at):
        request = simulated(_chat(spec), spec.max_tokens or 1)
        ids = list(request.prompt_token_ids)
        output = text_token_ids(filler_text(request.text_offset, request.max_tokens))
        # The last generated token is never fed back: its KV is not computed.
        computed = ids + output[:-1]
        keys: list[int] = []
        parent = 0
        for start in range(0, len(computed) - block_size + 1, block_size):
            parent = hash((parent, tuple(computed[start : start + block_size])))
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
