"""The block pool: sharing, LRU eviction order and the events it records."""

from __future__ import annotations

from vllm_fleet.launcher.sim.kvcache import BlockPool, ClearedEvent, RemovedEvent, StoredEvent
from vllm_fleet.launcher.sim.tokens import block_hashes, external_hash

SIZE = 4


def test_register_share_free_and_evict_in_lru_order_with_events() -> None:
    pool = BlockPool(num_blocks=4, block_size=SIZE, record_events=True)
    tokens_a, tokens_b = list(range(8)), list(range(100, 108))
    hashes_a, hashes_b = block_hashes(tokens_a, SIZE), block_hashes(tokens_b, SIZE)
    blocks_a = pool.take([], 2)
    pool.register(blocks_a, hashes_a, tokens_a, 0, 2)
    stored = pool.take_events()
    assert stored == [
        StoredEvent(tuple(external_hash(h) for h in hashes_a), None, tuple(tokens_a), SIZE)
    ]
    pool.free(blocks_a)
    assert pool.usage() == 0.0
    assert pool.cached_prefix(hashes_a, 2) == blocks_a
    blocks_b = pool.take([], 2)  # the two never-used blocks go first
    pool.register(blocks_b, hashes_b, tokens_b, 0, 2)
    pool.free(blocks_b)
    pool.take_events()
    shared = pool.take(pool.cached_prefix(hashes_a, 2), 0)  # a used again: b is now older
    pool.free(shared)
    pool.take([], 1)  # evicts b's last block first (freed last-first)
    assert pool.take_events() == [RemovedEvent((external_hash(hashes_b[1]),))]
    assert pool.cached_prefix(hashes_b, 2) == blocks_b[:1]
    assert pool.cached_prefix(hashes_a, 2) == blocks_a


def test_reset_is_refused_while_blocks_are_held_and_clears_otherwise() -> None:
    pool = BlockPool(num_blocks=2, block_size=SIZE, record_events=True)
    held = pool.take([], 1)
    assert not pool.reset()
    pool.free(held)
    assert pool.reset()
    assert pool.take_events() == [ClearedEvent()]
