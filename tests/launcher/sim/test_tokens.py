"""The simulator's tokenizer rule and vLLM-compatible block hashes."""

from __future__ import annotations

from vllm_fleet.launcher.sim.tokens import (
    DEFAULT_NONE_HASH_SEED,
    SPECIAL_BASE,
    block_hashes,
    chat_token_ids,
    external_hash,
    filler_word,
    none_hash,
    output_token_id,
    text_token_ids,
)

#: Computed with vLLM 0.32's own hash_block_tokens(sha256, ...) and init_none_hash(sha256).
VLLM_FIRST_BLOCK_HASH = 1277450015008481532
VLLM_TEXT = "hello world, this is a test of the block hashing rule!" * 3


def test_text_is_four_bytes_per_token_and_the_same_lead_gives_the_same_ids() -> None:
    assert text_token_ids("") == [0]
    assert len(text_token_ids("abcd")) == 1
    assert len(text_token_ids("abcde")) == 2
    assert len(text_token_ids("é" * 4)) == 2  # 8 UTF-8 bytes
    long = text_token_ids("The quick brown fox jumps over the lazy dog. " * 10)
    longer = text_token_ids("The quick brown fox jumps over the lazy dog. " * 10 + "And more.")
    assert longer[: len(long) - 1] == long[:-1]
    assert all(0 <= token < SPECIAL_BASE for token in longer)


def test_a_chat_turn_starts_with_every_id_of_the_previous_turns_prompt() -> None:
    first = [("system", "You are terse."), ("user", "Hi there")]
    second = [*first, ("assistant", "Hello."), ("user", "How are you?")]
    assert chat_token_ids(second)[: len(chat_token_ids(first))] == chat_token_ids(first)
    assert len(chat_token_ids(first)) == 2 + (4 + 4) + (4 + 2)
    assert chat_token_ids([("user", "x")]) != chat_token_ids([("system", "x")])


def test_block_hashes_are_vllm_sha256_chained_over_full_blocks() -> None:
    ids = text_token_ids(VLLM_TEXT)
    hashes = block_hashes(ids, 16, root=none_hash(DEFAULT_NONE_HASH_SEED))
    assert len(ids) == 41
    assert len(hashes) == 2  # the partial third block has no hash
    assert external_hash(hashes[0]) == VLLM_FIRST_BLOCK_HASH
    other = block_hashes([99, *ids[1:]], 16, root=none_hash(DEFAULT_NONE_HASH_SEED))
    assert other[1] != hashes[1]  # a block's hash depends on every block before it


def test_a_generated_reply_re_tokenizes_to_the_generated_ids() -> None:
    reply = "".join(filler_word(7, i) for i in range(50))
    assert text_token_ids(reply) == [output_token_id(7, i) for i in range(50)]
