"""The KV-cache block pool of one simulated replica, after vLLM V1's BlockPool (no clock, no I/O).

What matters for routing, and so what is modelled:

- capacity: `num_blocks` blocks of `block_size` tokens; a request holds
  ceil(tokens / block_size) of them while it runs, and runs only if they can be allocated;
- automatic prefix caching: a full prompt block, once allocated, is registered under its chained
  hash; a later request whose leading blocks have the same hashes takes those blocks (ref count
  + 1) instead of computing them;
- LRU eviction: a freed block goes to the tail of the free queue but keeps its hash, so it can
  still be hit; allocation takes from the head and then forgets the hash. A request frees its
  blocks last-first, so its tail blocks are evicted before its head blocks, as in vLLM;
- the events vLLM publishes for all this (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`),
  collected here as plain records and sent by `vllm_fleet.launcher.sim.kv_events`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm_fleet.launcher.sim.tokens import external_hash


@dataclass(frozen=True)
class StoredEvent:
    """Blocks newly registered in the prefix cache, in prompt order (vLLM's BlockStored)."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True)
class RemovedEvent:
    """A cached block whose hash was dropped to reuse the block (vLLM's BlockRemoved)."""

    block_hashes: tuple[int, ...]


@dataclass(frozen=True)
class ClearedEvent:
    """The whole prefix cache was reset (vLLM's AllBlocksCleared)."""


CacheEvent = StoredEvent | RemovedEvent | ClearedEvent


@dataclass
class BlockPool:
    """Blocks, their ref counts, the hash -> block map and the LRU free queue."""

    num_blocks: int
    block_size: int
    #: Record events (only when someone publishes them; otherwise they would pile up).
    record_events: bool = False
    _ref: list[int] = field(init=False)
    _hash: list[bytes | None] = field(init=False)
    _cached: dict[bytes, int] = field(init=False, default_factory=dict)
    #: Free blocks, least recently freed first (eviction order). Values unused.
    _free: OrderedDict[int, None] = field(init=False)
    _events: list[CacheEvent] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError("a block pool needs at least one block of at least one token")
        self._ref = [0] * self.num_blocks
        self._hash = [None] * self.num_blocks
        self._free = OrderedDict.fromkeys(range(self.num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks with no user (cached or not): what vLLM counts as free."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks registered under a hash (in use or free)."""
        return len(self._cached)

    def usage(self) -> float:
        """vLLM's `kv_cache_usage_perc`: the fraction of blocks some request holds."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def cached_prefix(self, hashes: Sequence[bytes], max_blocks: int) -> list[int]:
        """The blocks holding the longest leading run of `hashes` (at most `max_blocks`)."""
        blocks: list[int] = []
        for block_hash in hashes[:max_blocks]:
            block = self._cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_take(self, hit_blocks: Sequence[int], new_blocks: int) -> bool:
        """Whether `hit_blocks` can be shared and `new_blocks` allocated right now."""
        idle_hits = sum(1 for block in hit_blocks if self._ref[block] == 0)
        return new_blocks + idle_hits <= len(self._free)

    def take(self, hit_blocks: Sequence[int], new_blocks: int) -> list[int]:
        """Share `hit_blocks`, then allocate `new_blocks`; check `can_take` first."""
        if not self.can_take(hit_blocks, new_blocks):
            raise RuntimeError("block pool exhausted; check can_take first")
        for block in hit_blocks:
            if self._ref[block] == 0:
                del self._free[block]
            self._ref[block] += 1
        return [*hit_blocks, *self._allocate(new_blocks)]

    def _allocate(self, count: int) -> list[int]:
        blocks: list[int] = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self._ref[block] = 1
            blocks.append(block)
        return blocks

    def _evict(self, block: int) -> None:
        block_hash = self._hash[block]
        if block_hash is None:
            return
        self._hash[block] = None
        if self._cached.get(block_hash) == block:
            del self._cached[block_hash]
            if self.record_events:
                self._events.append(RemovedEvent((external_hash(block_hash),)))

    def register(
        self,
        blocks: Sequence[int],
        hashes: Sequence[bytes],
        token_ids: Sequence[int],
        start: int,
        end: int,
    ) -> None:
        """Register blocks `start`..`end`-1 of a request under their hashes (now full).

        A hash another block already holds stays with that block (two requests computed the
        same prefix at once); the duplicate block is then freed like any uncached block.
        """
        run: list[int] = []
        for index in range(start, end):
            block, block_hash = blocks[index], hashes[index]
            if self._hash[block] is not None or block_hash in self._cached:
                self._stored(run, hashes, token_ids)
                run = []
                continue
            self._hash[block] = block_hash
            self._cached[block_hash] = block
            run.append(index)
        self._stored(run, hashes, token_ids)

    def _stored(self, run: list[int], hashes: Sequence[bytes], token_ids: Sequence[int]) -> None:
        """One BlockStored per run of consecutive newly registered blocks, as vLLM sends."""
        if not run or not self.record_events:
            return
        first, size = run[0], self.block_size
        parent = external_hash(hashes[first - 1]) if first > 0 else None
        self._events.append(
            StoredEvent(
                block_hashes=tuple(external_hash(hashes[i]) for i in run),
                parent_block_hash=parent,
                token_ids=tuple(token_ids[first * size : (run[-1] + 1) * size]),
                block_size=size,
            )
        )

    def free(self, blocks: Sequence[int]) -> None:
        """Release a request's blocks, last block first (it is evicted first)."""
        for block in reversed(blocks):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                self._free[block] = None

    def reset(self) -> bool:
        """Forget every cached hash, as vLLM's reset_prefix_cache; refused while blocks are held."""
        if self.num_free != self.num_blocks:
            return False
        self._cached.clear()
        self._hash = [None] * self.num_blocks
        if self.record_events:
            self._events.append(ClearedEvent())
        return True

    def take_events(self) -> list[CacheEvent]:
        events, self._events = self._events, []
        return events
