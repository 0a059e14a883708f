"""Where a new prefix goes when the cost policy finds several replicas equally good: its home.

Costs tie when replicas are equal (idle, or equally loaded), and a random draw then puts a new
prefix on a different replica in every router. Rendezvous hashing on the prefix's first keys
makes every router (and a restarted one) pick the same replica without sharing any state.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from vllm_fleet.router.prefix_index import BLOCK_BYTES, FINE_BYTES
from vllm_fleet.router.state import ReplicaState

#: Keys of a request's prefix that name its home (see rendezvous): the first FINE_BYTES of
#: routing text, where a system prompt or a conversation's opening sits.
HOME_BLOCKS = FINE_BYTES // BLOCK_BYTES
_MASK64 = (1 << 64) - 1


def rendezvous(key: int, url: str) -> int:
    """Rendezvous (highest random weight) score of ``url`` for a prefix key: the tied replica
    with the highest score is the prefix's home.

    Why: the keys are the same in every router process (prefix_keys hashes with crc32, not
    Python's salted hash), so two routers in front of the same replicas send a new prefix to
    the same one, and a router that restarted finds it where it left it. Removing a replica
    moves only the prefixes it was home to. splitmix64's finaliser over key xor crc32(url): a
    few integer operations per tied replica, and only on ties.
    """
    z = ((key ^ zlib.crc32(url.encode())) + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def home(tied: Sequence[ReplicaState], prefix: Sequence[int]) -> ReplicaState:
    """The prefix's home among ``tied`` (non-empty; ``prefix`` non-empty)."""
    key = prefix[min(len(prefix), HOME_BLOCKS) - 1]
    return max(tied, key=lambda r: rendezvous(key, r.url))
