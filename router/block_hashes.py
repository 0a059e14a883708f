"""vLLM's prefix-cache block hashes of a prompt, exactly as vLLM 0.32 computes them (no I/O).

Why here: the router's precise prefix matching (vllm_fleet.router.precise) looks a request's
blocks up in the block set a replica publishes through KV events, and those are keyed by
vLLM's own hashes. The simulator (vllm_fleet.launcher.sim) hashes its blocks with the same
functions, so there is one copy of vLLM's formula; the real-vLLM test
(tests/e2e/test_prefix_vllm.py) checks it against vLLM itself.

The formula (vllm/v1/core/kv_cache_utils.py, ``hash_block_tokens`` and
``get_request_block_hasher``; vllm/utils/hashing.py ``sha256``):

- only full blocks of ``block_size`` tokens are hashed; block i's hash is
  ``sha256(pickle((parent, tuple(block i's token ids), extra_keys)))`` with ``parent`` the
  previous block's hash, or NONE_HASH for block 0;
- NONE_HASH = ``sha256(pickle(seed))``, the seed being ``$PYTHONHASHSEED`` when the replica
  sets it, else the fixed ``"vllm-none-hash"`` for the cryptographic algorithms (vLLM 0.32's
  default ``--prefix-caching-hash-algo sha256`` is one): hashes agree across processes and
  hosts without any setting. (``xxhash`` algorithms draw a random per-process seed: no one
  outside the replica can reproduce those.)
- ``extra_keys`` is None for a plain text request, else a tuple of ``("lora", name, path)`` on
  every block of a LoRA request, then ``("cache_salt", salt)`` on block 0 only (multimodal and
  prompt-embeds keys are not reproduced: such requests are not matched precisely);
- KV events carry each hash's low 64 bits as an int (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``,
  on by default) or the 32 bytes: ``external_hash`` gives the int, and a block set holding the
  bytes form is matched with ``event_key``.

vLLM never reports the last prompt token as a cache hit (it must compute at least one token
to produce logits), so a prompt of n tokens can hit at most ``(n - 1) // block_size`` blocks.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: vLLM's seed of NONE_HASH when PYTHONHASHSEED is unset (kv_cache_utils.DEFAULT_NONE_HASH_SEED).
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
#: The ``--prefix-caching-hash-algo`` values reproduced here (vLLM 0.32's default first).
HASH_ALGOS = ("sha256",)
_INT_HASH_MASK = (1 << 64) - 1


def sha256_pickle(value: object) -> bytes:
    """vLLM's ``sha256`` hash function: SHA-256 of the value's highest-protocol pickle."""
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


@functools.cache
def none_hash(seed: str = DEFAULT_NONE_HASH_SEED) -> bytes:
    """The parent hash of every prompt's first block, for a replica hashing with ``seed``."""
    return sha256_pickle(seed)


def extra_keys(
    block: int, lora: tuple[str, str] | None = None, cache_salt: str | None = None
) -> tuple[Any, ...] | None:
    """vLLM's extra keys of block number ``block``: LoRA (name, path) on every block of a LoRA
    request, the request's cache salt on block 0; None when there are none."""
    keys: list[Any] = []
    if lora is not None:
        keys.append(("lora", lora[0], lora[1]))
    if cache_salt and block == 0:
        keys.append(("cache_salt", cache_salt))
    return tuple(keys) if keys else None


def extend_block_hashes(
    hashes: list[bytes],
    token_ids: Sequence[int],
    block_size: int,
    blocks: int,
    root: bytes | None = None,
    *,
    lora: tuple[str, str] | None = None,
    cache_salt: str | None = None,
) -> None:
    """Grow ``hashes`` (the chain of ``token_ids`` so far) to ``blocks`` hashes, as the ids
    allow; ``root`` is NONE_HASH (vLLM's default seed when None)."""
    blocks = min(blocks, len(token_ids) // block_size)
    parent = hashes[-1] if hashes else (root if root is not None else none_hash())
    plain = lora is None and not cache_salt
    for index in range(len(hashes), blocks):
        start = index * block_size
        extra = None if plain else extra_keys(index, lora, cache_salt)
        parent = sha256_pickle((parent, tuple(token_ids[start : start + block_size]), extra))
        hashes.append(parent)


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    root: bytes | None = None,
    *,
    lora: tuple[str, str] | None = None,
    cache_salt: str | None = None,
) -> list[bytes]:
    """Chained hashes of the full blocks of ``token_ids`` (a partial tail has none)."""
    hashes: list[bytes] = []
    blocks = len(token_ids) // block_size
    extend_block_hashes(
        hashes, token_ids, block_size, blocks, root, lora=lora, cache_salt=cache_salt
    )
    return hashes


def external_hash(block_hash: bytes) -> int:
    """The int a KV event carries for a block hash (vLLM's default: its low 64 bits)."""
    return int.from_bytes(block_hash, "big") & _INT_HASH_MASK


def event_key(block_hash: int | bytes) -> int:
    """A published hash in the int form, whichever form the replica published it in."""
    return block_hash if isinstance(block_hash, int) else external_hash(block_hash)


def leading_hits(hashes: Iterable[int], held: Container[int | bytes]) -> int:
    """How many leading blocks of ``hashes`` are in ``held``: vLLM's prefix-cache lookup, which
    stops at the first block it does not hold."""
    count = 0
    for block_hash in hashes:
        if block_hash not in held:
            break
        count += 1
    return count


@dataclass(frozen=True)
class PromptBlocks:
    """One request's prompt as vLLM will see it: its length in tokens and its blocks' published
    hashes for each block size the candidate replicas use."""

    tokens: int
    hashes: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    def cached_tokens(self, block_size: int, held: Container[int | bytes]) -> int | None:
        """Prompt tokens a replica with ``block_size`` holding ``held`` will find cached (None
        when the hashes for that block size were not computed)."""
        hashes = self.hashes.get(block_size)
        if hashes is None:
            return None
        usable = hashes[: max(0, self.tokens - 1) // block_size]
        return leading_hits(usable, held) * block_size


def prompt_blocks(
    token_ids: Sequence[int],
    block_sizes: Iterable[int],
    *,
    seed: str = DEFAULT_NONE_HASH_SEED,
    lora: tuple[str, str] | None = None,
    cache_salt: str | None = None,
) -> PromptBlocks:
    """The published hashes of ``token_ids`` for each of ``block_sizes`` (each > 0)."""
    root = none_hash(seed)
    hashes = {
        size: tuple(
            external_hash(h)
            for h in block_hashes(token_ids, size, root, lora=lora, cache_salt=cache_salt)
        )
        for size in set(block_sizes)
        if size > 0
    }
    return PromptBlocks(tokens=len(token_ids), hashes=hashes)
