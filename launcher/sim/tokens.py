"""Deterministic token ids and vLLM block hashes for the simulator (no tokenizer, no model).

Why token ids at all: vLLM's prefix cache works on token ids, so the simulator needs ids for
which "the same leading text gives the same leading ids", cheaply and without a vocabulary.

The rule (about 4 bytes per token, like English text through a BPE tokenizer):

- text: its UTF-8 bytes, cut into 4-byte pieces (the last one zero-padded); each piece read as
  a little-endian uint32 is one token id. At least one token per text, as before.
- chat: each message rendered like the tiny model's chat template
  (``<|role|>\\n{content}</s>\\n``): ``[ROLE, NEWLINE, *content ids, EOS, NEWLINE]``, the messages
  in order, then the generation prompt ``[ROLE(assistant), NEWLINE]``. The next turn of a chat
  therefore starts with every id of the previous turn's prompt, as with a real template.
- a prompt given as token ids keeps its ids.

Special ids sit above 2**32, so no text piece can produce one.

Block hashes are vLLM's default (``--prefix-caching-hash-algo sha256``): block i's hash is
``sha256(pickle((parent hash or NONE_HASH, tuple(block ids), None)))``, NONE_HASH is
``sha256(pickle(seed))`` with seed ``$PYTHONHASHSEED`` or vLLM's fixed "vllm-none-hash", and KV
events carry the hash's low 64 bits as an int (vLLM's ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``
default). So the same ids give the same hashes in the simulator and in vLLM 0.32.
"""

from __future__ import annotations

import array
import hashlib
import os
import pickle
import sys
from collections.abc import Iterable, Mapping, Sequence

#: Bytes of text per token id.
BYTES_PER_TOKEN = 4
#: First special id; text ids are uint32 values, all below it.
SPECIAL_BASE = 1 << 32
NEWLINE_ID = SPECIAL_BASE + 1
EOS_ID = SPECIAL_BASE + 2
#: Role markers of the roles OpenAI defines; any other role hashes into ROLE_OTHER_BASE + 0..255.
ROLE_IDS: Mapping[str, int] = {
    "system": SPECIAL_BASE + 16,
    "developer": SPECIAL_BASE + 17,
    "user": SPECIAL_BASE + 18,
    "assistant": SPECIAL_BASE + 19,
    "tool": SPECIAL_BASE + 20,
    "function": SPECIAL_BASE + 21,
}
ROLE_OTHER_BASE = SPECIAL_BASE + 256
#: Template tokens around each message's content, and after the last message.
CHAT_TOKENS_PER_MESSAGE = 4
CHAT_REPLY_PRIMER_TOKENS = 2

#: vLLM's NONE_HASH seed when PYTHONHASHSEED is unset (vllm/v1/core/kv_cache_utils.py).
DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
_INT_HASH_MASK = (1 << 64) - 1


def text_token_ids(text: str) -> list[int]:
    """Token ids of a text: one id per 4 UTF-8 bytes, at least one."""
    data = text.encode()
    pad = -len(data) % BYTES_PER_TOKEN
    if not data:
        pad = BYTES_PER_TOKEN
    words = array.array("I")
    if words.itemsize != BYTES_PER_TOKEN:  # pragma: no cover - every CPython platform we run on
        return [
            int.from_bytes(data[i : i + 4].ljust(4, b"\0"), "little")
            for i in range(0, max(len(data), 1), 4)
        ]
    words.frombytes(data + b"\0" * pad)
    if sys.byteorder != "little":  # pragma: no cover - x86 and arm64 are little-endian
        words.byteswap()
    return words.tolist()


def role_id(role: str) -> int:
    known = ROLE_IDS.get(role)
    if known is not None:
        return known
    digest = hashlib.blake2b(role.encode(), digest_size=1).digest()
    return ROLE_OTHER_BASE + digest[0]


def chat_token_ids(messages: Iterable[tuple[str, str]]) -> list[int]:
    """Ids of a chat prompt: every (role, content) in order, then the assistant header."""
    ids: list[int] = []
    for role, content in messages:
        ids += (role_id(role), NEWLINE_ID)
        if content:
            ids += text_token_ids(content)
        ids += (EOS_ID, NEWLINE_ID)
    ids += (ROLE_IDS["assistant"], NEWLINE_ID)
    return ids


def _sha256_pickle(value: object) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def none_hash(seed: str | None = None) -> bytes:
    """vLLM's parent hash of a first block, from PYTHONHASHSEED or vLLM's fixed default."""
    if seed is None:
        seed = os.environ.get("PYTHONHASHSEED", DEFAULT_NONE_HASH_SEED)
    return _sha256_pickle(seed)


def block_hashes(
    token_ids: Sequence[int], block_size: int, root: bytes | None = None
) -> list[bytes]:
    """Chained sha256 hashes of the full blocks of `token_ids` (a partial tail has none)."""
    parent = root if root is not None else none_hash()
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = _sha256_pickle((parent, tuple(token_ids[start : start + block_size]), None))
        hashes.append(parent)
    return hashes


def external_hash(block_hash: bytes) -> int:
    """The int a KV event carries for a block hash (vLLM's default: its low 64 bits)."""
    return int.from_bytes(block_hash, "big") & _INT_HASH_MASK
