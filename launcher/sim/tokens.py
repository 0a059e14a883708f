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
- generated text: one filler word per token, each word exactly 4 bytes (a space and three
  letters), and the token's id is that word's id under the text rule. So a reply sent back as
  the next turn's assistant message re-tokenizes to the ids that were generated, and the blocks
  cached while generating it are hits for the next turn, as with a real tokenizer.

Special ids sit above 2**32, so no text piece can produce one.

Block hashes are vLLM's default (``--prefix-caching-hash-algo sha256``), computed by
vllm_fleet.router.block_hashes (the one copy of vLLM's formula): block i's hash is
``sha256(pickle((parent hash or NONE_HASH, tuple(block ids), None)))``, NONE_HASH is
``sha256(pickle(seed))`` with seed ``$PYTHONHASHSEED`` or vLLM's fixed "vllm-none-hash", and KV
events carry the hash's low 64 bits as an int (vLLM's ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``
default). So the same ids give the same hashes in the simulator and in vLLM 0.32.
"""

from __future__ import annotations

import array
import functools
import hashlib
import os
import sys
from collections.abc import Iterable, Mapping, Sequence

# vLLM's hash formula has one copy, shared with the router's precise prefix matching (it is
# vLLM's, not the router's model of it; tests/e2e/test_prefix_vllm.py checks it against vLLM).
from vllm_fleet.router.block_hashes import DEFAULT_NONE_HASH_SEED as DEFAULT_NONE_HASH_SEED
from vllm_fleet.router.block_hashes import extend_block_hashes as extend_vllm_block_hashes
from vllm_fleet.router.block_hashes import external_hash as external_hash
from vllm_fleet.router.block_hashes import none_hash as seeded_none_hash

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

#: Generated words, 4 bytes each (one token each under the text rule).
FILLER_WORDS = (
    " the", " and", " for", " are", " but", " not", " you", " all", " any", " can", " her",
    " was", " one", " our", " out", " day", " get", " has", " him", " his", " how", " man",
    " new", " now", " old", " see", " two", " way", " who", " boy", " did", " its", " let",
    " put", " say", " she", " too", " use", " sky", " sea", " sun", " run", " big", " red",
    " fox", " dog", " cat", " map",
)  # fmt: skip


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


def filler_word(text_offset: int, index: int) -> str:
    """Generated token number `index` of a request whose prompt picked `text_offset`."""
    return FILLER_WORDS[(text_offset + index) % len(FILLER_WORDS)]


@functools.cache
def _word_id(word: str) -> int:
    (token,) = text_token_ids(word)
    return token


def output_token_id(text_offset: int, index: int) -> int:
    """The id of generated token `index`: its word's id under the text rule."""
    return _word_id(filler_word(text_offset, index))


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


def none_hash(seed: str | None = None) -> bytes:
    """vLLM's parent hash of a first block, from PYTHONHASHSEED or vLLM's fixed default."""
    if seed is None:
        seed = os.environ.get("PYTHONHASHSEED", DEFAULT_NONE_HASH_SEED)
    return seeded_none_hash(seed)


def block_hashes(
    token_ids: Sequence[int], block_size: int, root: bytes | None = None
) -> list[bytes]:
    """Chained sha256 hashes of the full blocks of `token_ids` (a partial tail has none)."""
    hashes: list[bytes] = []
    extend_block_hashes(hashes, token_ids, block_size, len(token_ids) // block_size, root)
    return hashes


def extend_block_hashes(
    hashes: list[bytes],
    token_ids: Sequence[int],
    block_size: int,
    blocks: int,
    root: bytes | None = None,
) -> None:
    """Grow `hashes` (the chain of `token_ids` so far) to `blocks` hashes, as ids allow."""
    extend_vllm_block_hashes(
        hashes, token_ids, block_size, blocks, root if root is not None else none_hash()
    )
