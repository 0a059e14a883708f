"""Which replica most likely holds how much of a request's prefix in its KV cache (no I/O).

vLLM's automatic prefix caching skips the prefill of every leading block of a prompt that a
replica still holds. The router has no tokenizer, so it keeps an *approximate* record, the way
the Gateway API Inference Extension's prefix scorer and Dynamo's ``ApproxKvIndexer`` do:

- the request's routing text (chat: every message in order with its role, tools first;
  completions: the prompt), model name included (a LoRA adapter is a model name, and its
  blocks are its own), is cut into BLOCK_BYTES = 128-byte blocks, about two 16-token vLLM blocks
  at ~4 bytes per token (COARSE_BYTES = 512 past the first FINE_BYTES = 2 KB). Block i's
  key is a chained hash of blocks 0..i, so one key stands for a whole prefix and equal keys
  mean equal prefixes;
- when a request is sent to a replica, its keys are recorded for that replica;
- the longest prefix a replica holds is found by binary search over the request's keys: a key
  is only ever recorded together with all keys before it, and recording refreshes all of
  them at once, so "held" is monotone along the chain (see ReplicaPrefixes.match).

Each replica's record is a two-generation LRU: keys go to ``young``; when ``young`` reaches half
the capacity it becomes ``old`` and the previous ``old`` is dropped. Recording is one dict
update per request instead of one linked-list move per block (an OrderedDict cost 66 us per
16 KB prompt against 9 us here, on this 2-core box under load), and memory stays within the
capacity. The capacity is what the replica can cache: vLLM's ``vllm:cache_config_info``
(num_gpu_blocks x block_size tokens) turned into 128-byte blocks, DEFAULT_CACHE_TOKENS until a
scrape says, and never more than the replica's share of the router's memory cap.

The record is corrected from what the replica reports:

- restart (its counters went back to zero, or the breaker re-admitted it after an ejection) or
  vLLM's AllBlocksCleared event: the record is dropped;
- the replica's measured ``vllm:prefix_cache_hits / queries`` against the hit rate the record
  predicted for the requests sent there: the prediction is scaled by ``trust`` = measured /
  predicted (at most 1), and dropped outright when the replica shows it forgot (measured
  under FORGOT_RATIO of the prediction). Other routers and direct clients only ever raise the
  measured rate, so they never lower the trust in what this router sent.

Two routers: each records only what it sends, so a prefix group both send is cached (and
paid for once) on up to two replicas; after that each router keeps sending it where it did.
"""

from __future__ import annotations

import bisect
import json
import math
import operator
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

#: Bytes per hashed block: ~32 tokens at ~4 bytes per token, two of vLLM's 16-token GPU
#: blocks (the CPU backend's 128-token blocks are handled by rounding the prediction down, see
#: cached_tokens). 64 bytes (one GPU block) doubles the per-request cost for a precision of
#: 16 tokens that no routing decision needs: keys for a 16 KB prompt took 70 us at 64 bytes
#: and ~35 us at 128 on this project's loaded 2-core CI box, json.loads of the body 16 us.
BLOCK_BYTES = 128
#: Past the first FINE_BYTES of routing text blocks are COARSE_BYTES long: a 16 KB prompt
#: gets 44 keys instead of 125. The per-request cost is per key (slicing, hashing, recording):
#: with 128-byte blocks throughout, a router in front of instant replicas spent 0.72 ms of CPU
#: per 16 KB request against 0.57 without the index; differences between prompts sit in their
#: first KBs (system prompt, then the question) or at a turn boundary of a long conversation,
#: where 128 tokens of precision are what vLLM's CPU blocks have anyway.
FINE_BYTES = 2048
COARSE_BYTES = 512
#: Bytes per token assumed to turn routing text into tokens (the proxy's estimate too).
BYTES_PER_TOKEN = 4
#: Routing text beyond this is not hashed: it bounds the per-request cost (~1,000 blocks).
MAX_PREFIX_BYTES = 64 * 1024
#: Tokens a replica is assumed to cache until its metrics say (a small GPU's KV cache).
DEFAULT_CACHE_TOKENS = 256 * 1024
#: Memory the whole index may use, and the measured cost of one key (dict slot + int key).
DEFAULT_MEMORY_BYTES = 64 << 20
ENTRY_BYTES = 100
#: Trust never falls below this: a replica with a low measured hit rate still gets a little
#: credit for a long cached prefix, and the measure can recover.
MIN_TRUST = 0.1
#: Measured hit rate below this fraction of the prediction: the replica forgot the record.
FORGOT_RATIO = 0.2
#: Tokens queried (replica side) and predicted (router side) before the comparison counts.
#: Twenty-odd prompts of a few thousand tokens, not two: the router predicts a hit when it
#: sends, the replica counts it when it prefills, and a burst of one group's first requests
#: is computed side by side (each a miss) before any is cached. At 4,096 that lag, in a
#: run's first seconds, read as "the replica forgot": its record was dropped and its trust
#: set to 0.1, so the router saw it holding nothing and the three others, holding every
#: group between them, took all the traffic (scenario 8: one replica served 3-8 % of the
#: requests in 3 runs of 7).
MIN_COMPARE_TOKENS = 32768.0
#: Most blocks a replica's event block set may hold (~35 MB of set): far above any GPU's block
#: count (an 80 GB H100 with an 8B model holds ~30,000 16-token blocks); more means removals
#: were missed (batches beyond the publisher's high-water mark) and the set is dropped.
MAX_EVENT_BLOCKS = 1 << 19
#: Bounds of ReplicaPrefixes.token_scale (real tokens per estimated token): 1 to 8 bytes a
#: token covers byte-level to large-vocabulary tokenizers.
TOKEN_SCALE_MIN = 0.5
TOKEN_SCALE_MAX = 4.0
#: Half-life (s) of the predicted / measured hit-rate windows.
HIT_HALF_LIFE_S = 30.0
#: Position multipliers of prefix_keys (fixed seed: the same text gives the same keys in every
#: process, which the balancer's rendezvous tie-break relies on across routers).
_ENDS = (
    *range(BLOCK_BYTES, FINE_BYTES + 1, BLOCK_BYTES),
    *range(FINE_BYTES + COARSE_BYTES, MAX_PREFIX_BYTES + 1, COARSE_BYTES),
)
_SLICES = tuple(slice(start, end) for start, end in zip((0, *_ENDS), _ENDS, strict=False))
_SEEDED = random.Random(0x5EED)
_MULTIPLIERS = tuple(_SEEDED.getrandbits(61) | 1 for _ in _ENDS)


def routing_text(payload: Mapping[str, Any]) -> str | None:
    """The text whose prefix decides what a replica has cached, or None when there is none.

    Chat: tools (they precede the messages in most chat templates), then every message in
    order with its role; a message with more than role and string content is serialised
    whole, so names, tool calls and content parts count too. Completions: the prompt (a single
    string, or a token-id list as its text). The separators cannot occur inside JSON strings'
    meaning here, so ``user: "a", "b"`` and ``user: "a b"`` differ.
    """
    messages = payload.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        tools = payload.get("tools")
        if tools:
            parts.append(_json(tools))
        for m in messages:
            if isinstance(m, dict) and len(m) == 2 and isinstance(m.get("content"), str):
                parts.append(f"{m.get('role')}\x1f{m['content']}")
            else:
                parts.append(_json(m))
        return "\x1e".join(parts)
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int):  # one prompt given as token ids
            return ",".join(map(str, prompt))
        if isinstance(first, str) and len(prompt) == 1:
            return first
    return None


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def prefix_keys(model: str, text: str) -> tuple[int, ...]:
    """Chained keys of the full blocks of ``text`` (BLOCK_BYTES, then COARSE_BYTES past
    FINE_BYTES; a partial last block is not cached by vLLM either), up to MAX_PREFIX_BYTES.

    Key i = crc32(model) + sum over j <= i of crc32(block j) * M[j], with M fixed random odd
    61-bit multipliers (so the same blocks in another order give other keys). All iteration is
    C-level (slicing, map, accumulate): no Python call per block. crc32 rather than Python's
    bytes hash, which is salted per process: two routers (or one restarted) must compute the
    same keys for the same text, so that they agree on a new prefix's home (the balancer's
    rendezvous tie-break); as fast as hash() here, and 32 bits per block with a 61-bit
    position multiplier leave collisions far below anything a routing decision notices.
    """
    data = text.encode("utf-8", "surrogatepass")
    full = bisect.bisect_right(_ENDS, len(data))
    if not full:
        return ()
    blocks = map(data.__getitem__, _SLICES[:full])
    seed = zlib.crc32(model.encode("utf-8", "surrogatepass"))
    keys = accumulate(map(operator.mul, map(zlib.crc32, blocks), _MULTIPLIERS), initial=seed)
    next(keys)  # the seed itself
    return tuple(keys)


def prefix_bytes(blocks: int) -> int:
    """Bytes of routing text the first ``blocks`` keys cover."""
    return _ENDS[blocks - 1] if blocks > 0 else 0


def request_prefix(model: str, payload: Mapping[str, Any]) -> tuple[int, ...]:
    """The prefix keys of one parsed request body (empty when it carries no prompt)."""
    text = routing_text(payload)
    return prefix_keys(model, text) if text else ()


def _decay(dt: float) -> float:
    return math.exp(-math.log(2.0) * max(0.0, dt) / HIT_HALF_LIFE_S)


@dataclass
class ReplicaPrefixes:
    """The prefixes one replica is believed to hold, and how far to believe it."""

    #: Keys the index may hold for this replica (BLOCK_BYTES blocks).
    capacity: int = DEFAULT_CACHE_TOKENS * BYTES_PER_TOKEN // BLOCK_BYTES
    #: The replica's KV block size in tokens (vLLM caches whole blocks only); 0 = unknown.
    block_tokens: int = 0
    #: Tokens the replica generates per request (recent mean, from its counters; 0 = unknown):
    #: what it holds past the end of a prompt it served, the reply (see cached_tokens).
    reply_tokens: float = 0.0
    #: Measured / predicted hit rate, in [MIN_TRUST, 1]; scales every prediction.
    trust: float = 1.0
    #: Times the record was dropped (restart, cleared cache, forgotten), for operators.
    resets: int = 0
    #: Predicted cached bytes and routing-text bytes of requests sent here (decayed).
    predicted_bytes: float = 0.0
    sent_bytes: float = 0.0
    #: Measured prefix-cache hits and queried tokens (decayed), and the last counter values.
    measured_hits: float = 0.0
    measured_queries: float = 0.0
    _counters: tuple[float, float, float] | None = field(default=None, repr=False)
    #: What the replica's KV events said (vllm_fleet.router.kv_events); None when it publishes none.
    events: KvBlockSet | None = None
    #: Key -> True for the last key of a recorded request (its reply follows), else None.
    _young: dict[int, bool | None] = field(default_factory=dict, repr=False)
    _old: dict[int, bool | None] = field(default_factory=dict, repr=False)
    _sent_at: float = field(default=0.0, repr=False)

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def match(self, keys: Sequence[int]) -> int:
        """How many leading blocks of ``keys`` this replica holds (binary search: held keys
        form a prefix of the chain, see the module docstring)."""
        young, old = self._young, self._old
        lo, hi = 0, len(keys)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            key = keys[mid - 1]
            if key in young or key in old:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def cached_tokens(self, keys: Sequence[int]) -> float:
        """Prompt tokens the replica is expected to skip: the matched bytes in tokens, plus
        ``reply_tokens`` when the match ends where a request sent here ended, rounded down to
        whole KV blocks when the block size is known, times ``trust``.

        The reply: vLLM caches the blocks a request generates as well as its prompt, and the
        next turn of a conversation sends that reply back after the same prompt. The router
        never hashes replies (they stream through it), so without this the holder of a
        conversation looked ~one reply less cached than it is, and in scenario 9 (multi-turn)
        lost the next turn to a replica with one request less running."""
        if not keys:
            return 0.0
        held = self.match(keys)
        tokens = prefix_bytes(held) // BYTES_PER_TOKEN
        if held and held < len(keys) and self.reply_tokens > 0:
            last = keys[held - 1]
            if self._young[last] if last in self._young else self._old.get(last):
                tokens += int(self.reply_tokens)
        if self.block_tokens > 0:
            tokens -= tokens % self.block_tokens
        return tokens * self.trust

    def record(self, keys: Sequence[int], now: float) -> None:
        """``keys`` were sent here: the replica will hold them (and refreshes what it held)."""
        if not keys:
            return
        keep = _decay(now - self._sent_at)
        self._sent_at = now
        self.predicted_bytes = self.predicted_bytes * keep + prefix_bytes(self.match(keys))
        self.sent_bytes = self.sent_bytes * keep + prefix_bytes(len(keys))
        young = self._young
        # Last block first: a chain's early blocks are then the most recent and are evicted
        # last, as in vLLM (it frees a request's blocks tail first), so held keys stay a
        # prefix of the chain when evict() takes the least recent ones.
        young.update(dict.fromkeys(reversed(keys)))
        young[keys[-1]] = True
        if len(young) >= max(1, self.capacity // 2):
            self._old = young
            self._young = {}

    def clear(self) -> None:
        """Forget every recorded prefix (the replica lost its cache), and what was measured
        against the record: the sent and the measured side restart together. Clearing only
        the sent side left the replica's queried tokens over a few new sends, a token_scale of
        3-4 that priced every prompt there 3-4 times over, so it got nothing more and the
        ratio never came back (scenario 8: one replica of four served 3 % of the requests in
        one run of three, mean latency 0.59-0.64 s against 0.53)."""
        if self._young or self._old:
            self.resets += 1
        self._young = {}
        self._old = {}
        self.predicted_bytes = self.sent_bytes = 0.0
        self.measured_hits = self.measured_queries = 0.0

    def evict(self, n: int) -> None:
        """Drop about ``n`` of the least recently recorded keys (the replica evicted that
        many blocks' worth): the old generation first, then the young one from its start."""
        for gen in (self._old, self._young):
            if n <= 0:
                return
            if n >= len(gen):
                n -= len(gen)
                gen.clear()
                continue
            for key in list(gen)[:n]:
                del gen[key]
            return

    def correct(self, kind: str, hashes: Sequence[int | bytes], block_size: int = 0) -> None:
        """Apply one vLLM KV event to the replica's block set and correct the record with it:
        a cleared cache clears the record; evicting a share of the blocks evicts the same
        share of the record's keys (oldest first), whatever the bytes per token are."""
        if self.events is None:
            self.events = KvBlockSet()
        share = self.events.apply(kind, hashes, block_size)
        if kind == "AllBlocksCleared":
            self.clear()
        elif share > 0:
            self.evict(math.ceil(share * len(self)))

    def set_capacity(self, cache_tokens: float, block_tokens: int, budget: int) -> None:
        """Size the record from the replica's KV cache (tokens) and its share of the memory
        cap (keys); shrinking drops the old generation if it no longer fits."""
        blocks = int(cache_tokens * BYTES_PER_TOKEN // BLOCK_BYTES)
        self.capacity = max(1, min(blocks, budget))
        self.block_tokens = max(0, block_tokens)
        if len(self) > self.capacity:
            self._old = {}

    @property
    def predicted_hit_rate(self) -> float | None:
        """Share of the prompt bytes sent here that the record said were cached."""
        return self.predicted_bytes / self.sent_bytes if self.sent_bytes > 0 else None

    @property
    def token_scale(self) -> float:
        """Real prompt tokens per estimated token (bytes / BYTES_PER_TOKEN) on this replica:
        its queried prompt tokens over the routing text this router sent it, both recent.

        vLLM's prefill price is learned per real token, while the router estimates prompts at
        4 bytes a token; a byte-level tokenizer (the tiny test model: ~1.6 bytes a token)
        makes every prompt 2.5x longer than estimated, and a cached prefix 2.5x more valuable.
        Other clients of the replica inflate the ratio (their prompts count, their bytes do
        not): it is clamped to [TOKEN_SCALE_MIN, TOKEN_SCALE_MAX] and 1 until both sides have
        MIN_COMPARE_TOKENS."""
        estimated = self.sent_bytes / BYTES_PER_TOKEN
        if estimated < MIN_COMPARE_TOKENS or self.measured_queries < MIN_COMPARE_TOKENS:
            return 1.0
        return min(TOKEN_SCALE_MAX, max(TOKEN_SCALE_MIN, self.measured_queries / estimated))

    @property
    def counters(self) -> tuple[float, float, float] | None:
        """The last prefix-cache counters folded in: (hits, queries, monotonic time of the
        scrape); router workers replay them (vllm_fleet.router.shared_board)."""
        return self._counters

    @property
    def measured_hit_rate(self) -> float | None:
        """Share of the replica's queried prompt tokens it found cached (its own counters)."""
        return self.measured_hits / self.measured_queries if self.measured_queries > 0 else None

    def observe_counters(self, hits: float, queries: float, at: float) -> None:
        """Fold in one scrape of ``vllm:prefix_cache_hits_total`` / ``queries_total``.

        Counters going backwards mean a restarted engine: its cache is empty, so is the record.
        Then the trust is re-derived: measured / predicted over the same recent window.
        """
        last, self._counters = self._counters, (hits, queries, at)
        if last is None:
            return
        d_hits, d_queries = hits - last[0], queries - last[1]
        if d_hits < 0 or d_queries < 0:
            self.clear()
            self.trust = 1.0
            return
        keep = _decay(at - last[2])
        self.measured_hits = self.measured_hits * keep + d_hits
        self.measured_queries = self.measured_queries * keep + d_queries
        self._update_trust()

    def _update_trust(self) -> None:
        predicted, measured = self.predicted_hit_rate, self.measured_hit_rate
        if predicted is None or measured is None or predicted <= 0.05:
            return
        enough_sent = self.sent_bytes >= MIN_COMPARE_TOKENS * BYTES_PER_TOKEN
        if self.measured_queries < MIN_COMPARE_TOKENS or not enough_sent:
            return
        ratio = measured / predicted
        if ratio < FORGOT_RATIO:
            self.clear()  # predicted hits the replica no longer has: start the record again
        self.trust = min(1.0, max(MIN_TRUST, ratio))


@dataclass
class KvBlockSet:
    """The blocks a replica reports holding through vLLM KV events (vllm_fleet.router.kv_events),
    and what those events did to its approximate record.

    This is the replica's real prefix cache, block hash by block hash. Matching a request
    against it needs vLLM's own block hashes of the request (same tokenizer, chat template and
    hash), which the router does not compute; the events instead *correct* the approximate
    record (ReplicaPrefixes): AllBlocksCleared drops it, BlockRemoved evicts the same share of
    its keys as the replica evicted of its blocks, BlockStored counts as confirmation.
    """

    hashes: set[int | bytes] = field(default_factory=set)
    #: Tokens per block, from the last BlockStored event (0 until one arrived).
    block_size: int = 0
    stored: int = 0
    removed: int = 0
    cleared: int = 0
    #: Sequence number of the last batch, and batches the publisher sent that we never got.
    last_seq: int = -1
    missed: int = 0
    #: Batches received (the subscriber is alive when this grows), and of them those a replay
    #: brought (vllm_fleet.router.kv_replay).
    batches: int = 0
    replayed: int = 0
    #: Times the set outgrew MAX_EVENT_BLOCKS and was dropped.
    overflows: int = 0

    def apply(self, kind: str, hashes: Sequence[int | bytes], block_size: int = 0) -> float:
        """Apply one event; returns the share in [0, 1] of the held blocks it removed."""
        if kind == "BlockStored":
            self.hashes.update(hashes)
            self.stored += len(hashes)
            self.block_size = block_size or self.block_size
            if len(self.hashes) > MAX_EVENT_BLOCKS:  # removals were lost: the set is wrong
                self.hashes.clear()
                self.overflows += 1
            return 0.0
        if kind == "BlockRemoved":
            held = len(self.hashes)
            gone = sum(1 for h in hashes if h in self.hashes)
            self.hashes.difference_update(hashes)
            self.removed += len(hashes)
            return gone / held if held else 0.0
        if kind == "AllBlocksCleared":
            self.hashes.clear()
            self.cleared += 1
            return 1.0
        return 0.0

    def note_seq(self, seq: int) -> None:
        """Count the batches skipped between the last sequence number and ``seq``."""
        if self.last_seq >= 0 and seq > self.last_seq + 1:
            self.missed += seq - self.last_seq - 1
        self.last_seq = seq
        self.batches += 1


def memory_bytes(records: Sequence[ReplicaPrefixes]) -> int:
    """Approximate memory the records use (ENTRY_BYTES per key, measured with tracemalloc)."""
    return sum(len(r) for r in records) * ENTRY_BYTES


def fit_budget(replicas: int, max_bytes: int) -> int:
    """Keys each of ``replicas`` records may hold so that all of them fit in ``max_bytes``."""
    return max(1, max_bytes // ENTRY_BYTES // max(1, replicas))
