"""Request validation and response bodies, without a server."""

from __future__ import annotations

import base64
import math
import struct

import pytest

from vllm_fleet.launcher.sim.config import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    SimConfig,
)
from vllm_fleet.launcher.sim.protocol import (
    ApiError,
    ResponseBuilder,
    embedding_response,
    embedding_vector,
    estimate_text_tokens,
    filler_text,
    parse_chat,
    parse_completion,
    parse_embedding,
)

CONFIG = SimConfig(model="m", max_model_len=100)


def test_prompt_tokens_are_a_quarter_of_the_characters_rounded_up() -> None:
    assert estimate_text_tokens("") == 1
    assert estimate_text_tokens("abcd") == 1
    assert estimate_text_tokens("abcde") == 2
    assert parse_completion({"prompt": [1, 2, 3], "max_tokens": 1}, CONFIG).prompt_tokens == 3


def test_chat_prompt_adds_template_tokens_per_message() -> None:
    body = {"messages": [{"role": "system", "content": "abcd"}, {"role": "user", "content": "x"}]}
    assert parse_chat(body, CONFIG).prompt_tokens == 2 + (4 + 1) + (4 + 1)


def test_default_max_tokens() -> None:
    chat = parse_chat({"messages": [{"role": "user", "content": "hi"}]}, SimConfig())
    completion = parse_completion({"prompt": "hi"}, SimConfig())
    assert chat.max_tokens == DEFAULT_CHAT_MAX_TOKENS
    assert completion.max_tokens == DEFAULT_COMPLETION_MAX_TOKENS


def test_default_max_tokens_shrinks_to_the_room_left_in_the_context() -> None:
    parsed = parse_chat({"messages": [{"role": "user", "content": "a" * 340}]}, CONFIG)
    assert parsed.prompt_tokens == 91
    assert parsed.max_tokens == 9


def test_max_completion_tokens_is_honoured_for_chat() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5}
    assert parse_chat(body, CONFIG).max_tokens == 5


def error_of(call: object, *args: object) -> ApiError:
    assert callable(call)
    with pytest.raises(ApiError) as info:
        call(*args)
    return info.value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 100}, "max_tokens"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"max_tokens": 1}, "prompt"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
    ],
)
def test_bad_completion_requests_are_400_naming_the_field(
    body: dict[str, object], param: str
) -> None:
    error = error_of(parse_completion, body, CONFIG)
    assert error.status == 400
    assert error.body()["error"]["param"] == param
    assert error.body()["error"]["type"] == "BadRequestError"


def test_context_overflow_message_is_vllms() -> None:
    error = error_of(parse_completion, {"prompt": "abcd", "max_tokens": 100}, CONFIG)
    assert "maximum context length is 100 tokens" in error.message
    assert "you requested 101 tokens" in error.message


def test_unknown_model_is_404_with_vllms_text() -> None:
    error = error_of(parse_completion, {"model": "other", "prompt": "x"}, CONFIG)
    assert error.status == 404
    assert error.body() == {
        "error": {
            "message": "The model `other` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


def test_missing_model_means_the_served_one() -> None:
    assert parse_completion({"prompt": "x"}, CONFIG).model == "m"


def test_non_object_bodies_and_bad_messages_are_400() -> None:
    assert error_of(parse_completion, [1, 2], CONFIG).status == 400
    assert error_of(parse_chat, {"messages": []}, CONFIG).status == 400
    assert error_of(parse_chat, {"messages": [{"content": "x"}]}, CONFIG).status == 400


def test_filler_text_is_deterministic_with_one_word_per_token() -> None:
    parsed = parse_completion({"prompt": "same"}, CONFIG)
    again = parse_completion({"prompt": "same"}, CONFIG)
    assert filler_text(parsed.text_offset, 9) == filler_text(again.text_offset, 9)
    assert len(filler_text(parsed.text_offset, 9).split()) == 9


def test_stream_chunks_look_like_vllms() -> None:
    parsed = parse_chat(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 2,
        },
        CONFIG,
    )
    builder = ResponseBuilder(parsed, "abc")
    assert builder.id == "chatcmpl-abc"
    assert builder.preamble_chunks()[0]["choices"][0]["delta"]["role"] == "assistant"
    last = builder.token_chunk(" x", "length")
    assert last["object"] == "chat.completion.chunk"
    assert last["choices"][0]["finish_reason"] == "length"
    usage_chunk = builder.usage_chunk(2)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["total_tokens"] == parsed.prompt_tokens + 2


def test_embeddings_are_deterministic_unit_vectors() -> None:
    a = embedding_vector("hello", 48)
    assert a == embedding_vector("hello", 48)
    assert a != embedding_vector("hellp", 48)
    assert math.isclose(sum(v * v for v in a), 1.0)


def test_base64_embedding_decodes_to_the_float_vector() -> None:
    parsed = parse_embedding({"input": ["x"], "encoding_format": "base64"}, CONFIG)
    body = embedding_response(parsed, 8)
    decoded = struct.unpack("<8f", base64.b64decode(body["data"][0]["embedding"]))
    assert decoded == pytest.approx(embedding_vector("x", 8), abs=1e-6)


def test_bad_embedding_requests() -> None:
    assert error_of(parse_embedding, {"input": 3}, CONFIG).status == 400
    assert error_of(parse_embedding, {"input": "x", "encoding_format": "hex"}, CONFIG).status == 400
    assert error_of(parse_embedding, {"input": "x", "model": "zz"}, CONFIG).status == 404
