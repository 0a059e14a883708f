"""One vLLM KV-event batch: its wire format decoded (vLLM 0.32's maps with a ``type`` key,
and older versions' arrays led by the type name), and folded into a replica's block set and
prefix record. vllm_fleet.router.kv_events receives the batches and keeps them in order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from vllm_fleet.router.precise import LiveBlockSet
from vllm_fleet.router.prefix_index import KvBlockSet
from vllm_fleet.router.state import ReplicaState

log = logging.getLogger("vllm_fleet.router")

#: Largest payload we decode: vLLM batches one engine step's events (a few KB, or a few MB
#: when a long prompt stores thousands of blocks); anything bigger is not vLLM.
MAX_PAYLOAD_BYTES = 16 << 20
#: Device tiers whose blocks the engine's prefix cache reuses directly.
DEVICE_MEDIA = frozenset({None, "GPU"})
EVENT_KINDS = ("BlockStored", "BlockRemoved", "AllBlocksCleared")


@dataclass(frozen=True)
class Event:
    """One KV event, whichever encoding it came in."""

    kind: str
    hashes: tuple[int | bytes, ...] = ()
    block_size: int = 0
    medium: str | None = None
    #: A BlockStored that starts a prompt (no parent, no LoRA, no extra keys): its first
    #: block's token ids, to check the replica hashes as the router does.
    root_tokens: tuple[int, ...] | None = None


_DECODER = msgspec.msgpack.Decoder()


def decode_batch(payload: bytes) -> list[Event]:
    """The events of one KVEventBatch payload; ValueError when it is not one."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"event batch of {len(payload)} bytes, over {MAX_PAYLOAD_BYTES}")
    try:
        batch = _DECODER.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not msgpack: {exc}") from None
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("not a KVEventBatch: expected [ts, [events...], ...]")
    return [e for raw in batch[1] if (e := _event(raw)) is not None]


def _event(raw: Any) -> Event | None:
    """One event from its map (``{"type": ...}``) or array (``["BlockStored", ...]``) form;
    None for kinds we do not use or malformed entries."""
    parent: Any = None
    tokens: Any = None
    lora: Any = None
    extra: Any = None
    if isinstance(raw, dict):
        kind = raw.get("type")
        hashes, size, medium = raw.get("block_hashes"), raw.get("block_size"), raw.get("medium")
        parent, tokens = raw.get("parent_block_hash"), raw.get("token_ids")
        lora = raw.get("lora_id") or raw.get("lora_name")
        extra = raw.get("extra_keys")
    elif isinstance(raw, list) and raw:
        kind = raw[0]
        hashes = raw[1] if len(raw) > 1 else None
        if kind == "BlockStored":  # tag, hashes, parent, token_ids, block_size, lora_id, medium
            parent, tokens = (raw[2], raw[3]) if len(raw) > 3 else (None, None)
            size = raw[4] if len(raw) > 4 else None
            lora = raw[5] if len(raw) > 5 else None
            medium = raw[6] if len(raw) > 6 else None
            lora = lora or (raw[7] if len(raw) > 7 else None)
            extra = raw[8] if len(raw) > 8 else None
        else:  # BlockRemoved: tag, hashes, medium
            size, medium = None, raw[2] if len(raw) > 2 else None
    else:
        return None
    if kind not in EVENT_KINDS:
        return None
    if kind == "AllBlocksCleared":
        return Event(kind)
    if not isinstance(hashes, list) or not all(isinstance(h, (int, bytes)) for h in hashes):
        return None
    size = size if isinstance(size, int) and size > 0 else 0
    root = None
    plain = parent is None and not lora and not (extra and any(k is not None for k in extra))
    stored = kind == "BlockStored" and plain and size and isinstance(tokens, list)
    if stored and len(tokens) >= size and all(isinstance(t, int) for t in tokens[:size]):
        root = tuple(tokens[:size])
    return Event(kind, tuple(hashes), size, medium if isinstance(medium, str) else None, root)


def apply_batch(
    replica: ReplicaState, seq: int, events: Iterable[Event], *, history: bool = False
) -> None:
    """Fold one batch into the replica's block set and correct its prefix record with it.

    A ``history`` batch (replayed on subscribing) happened before the router's record of what
    it sent since: it fills the block set but corrects nothing. Applied to the record, an old
    AllBlocksCleared (a reset long ago) cleared the prefixes this router had just sent there,
    and their next requests went wherever a tie fell (real vLLM: 0.51 of prompt tokens hit
    where 0.65 was possible)."""
    prefixes = replica.prefixes
    if history and prefixes.events is None:
        prefixes.events = KvBlockSet()
    for event in events:
        if event.medium in DEVICE_MEDIA:
            if history and prefixes.events is not None:
                prefixes.events.apply(event.kind, event.hashes, event.block_size)
            else:
                prefixes.correct(event.kind, event.hashes, event.block_size)
            held = prefixes.events
            if isinstance(held, LiveBlockSet) and event.kind == "BlockStored":
                held.confirm(event.hashes)
                if event.root_tokens is not None and event.hashes:
                    held.check_root(event.hashes[0], event.root_tokens, replica.url)
    if prefixes.events is not None:
        prefixes.events.note_seq(seq)


def block_hashes(events: Iterable[Event]) -> Iterator[int | bytes]:
    """Hashes of the stored device blocks in ``events`` (for tests and tools)."""
    for e in events:
        if e.kind == "BlockStored" and e.medium in DEVICE_MEDIA:
            yield from e.hashes
