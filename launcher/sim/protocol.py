"""The OpenAI wire format as vLLM speaks it: request validation and response bodies (no I/O).

Prompts are tokenized by a fixed rule, not a tokenizer (`vllm_fleet.launcher.sim.tokens`): one token
per 4 UTF-8 bytes of text, at least 1; a prompt given as token ids keeps its ids. A chat prompt is
rendered like a chat template: 4 tokens per message (role and markers) around its content, plus
2 for the assistant header. The same leading text therefore gives the same leading token ids,
which is what vLLM's prefix cache keys on.
Generated text is filler words, one 4-byte word (a space and three letters) per token, chosen by
the token index and a hash of the prompt, so the same request always yields the same text, and a
reply sent back in the next turn re-tokenizes to the generated ids
(`vllm_fleet.launcher.sim.tokens`).
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from vllm_fleet.launcher.sim.config import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    SimConfig,
)
from vllm_fleet.launcher.sim.tokens import (
    BYTES_PER_TOKEN,
    chat_token_ids,
    filler_word,
    text_token_ids,
)

Kind = Literal["completion", "chat"]


class ApiError(Exception):
    """An error answered as vLLM does: HTTP status plus `{"error": {...}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        err_type: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.err_type, self.param)


def error_body(status: int, message: str, err_type: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated completion or chat request, reduced to what the simulator uses."""

    kind: Kind
    model: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    #: The prompt's token ids (`vllm_fleet.launcher.sim.tokens`); the prefix cache keys on them.
    prompt_token_ids: tuple[int, ...]
    #: Picks the filler words, so equal prompts give equal text.
    text_offset: int
    #: stream_options.continuous_usage_stats (with include_usage): usage in every chunk.
    continuous_usage: bool = False
    #: vLLM's ``priority`` (smaller first; honoured under --scheduling-policy priority).
    priority: int = 0


def estimate_text_tokens(text: str) -> int:
    """Tokens of a text under the simulator's rule: ceil(UTF-8 bytes / 4), at least 1."""
    return max(1, math.ceil(len(text.encode()) / BYTES_PER_TOKEN))


def filler_token(text_offset: int, index: int) -> str:
    return filler_word(text_offset, index)


def filler_text(text_offset: int, count: int) -> str:
    return "".join(filler_token(text_offset, i) for i in range(count))


def _offset(seed_text: str) -> int:
    return int.from_bytes(hashlib.blake2b(seed_text.encode(), digest_size=4).digest(), "big")


def _require_object(body: object) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise bad_request("The request body must be a JSON object.")
    return body


def _model(body: Mapping[str, Any], config: SimConfig) -> str:
    model = body.get("model")
    if model is None:
        return config.model
    if not isinstance(model, str):
        raise bad_request("model must be a string.", "model")
    return model


def check_model(model: str, config: SimConfig) -> None:
    """404 like vLLM for a model this server does not serve."""
    if model and model != config.model:
        raise ApiError(
            404,
            f"The model `{model}` does not exist.",
            err_type="NotFoundError",
            param="model",
        )


def _optional_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer.", name)
    return value


def _max_tokens(body: Mapping[str, Any], kind: Kind, prompt_tokens: int, config: SimConfig) -> int:
    name = "max_tokens"
    requested = _optional_int(body, "max_tokens")
    if kind == "chat":
        completion_tokens = _optional_int(body, "max_completion_tokens")
        if completion_tokens is not None:
            name, requested = "max_completion_tokens", completion_tokens
    if requested is None:
        default = DEFAULT_CHAT_MAX_TOKENS if kind == "chat" else DEFAULT_COMPLETION_MAX_TOKENS
        room = config.max_model_len - prompt_tokens
        if room < 1:
            raise _context_error(config, prompt_tokens, default)
        return min(default, room)
    if requested < 1:
        raise bad_request(f"{name} must be at least 1, got {requested}.", name)
    if prompt_tokens + requested > config.max_model_len:
        raise _context_error(config, prompt_tokens, requested)
    return requested


def _context_error(config: SimConfig, prompt_tokens: int, max_tokens: int) -> ApiError:
    return bad_request(
        f"This model's maximum context length is {config.max_model_len} tokens. However, you "
        f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
        f"{max_tokens} in the completion). Please reduce the length of the messages or "
        "completion.",
        "max_tokens",
    )


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous usage stats) as vLLM reads them."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean.", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False, False
    if not isinstance(options, Mapping):
        raise bad_request("stream_options must be an object.", "stream_options")
    if not stream:
        raise bad_request("Stream options can only be defined when `stream=True`.", "stream")
    usage = bool(options.get("include_usage", False))
    return stream, usage, usage and bool(options.get("continuous_usage_stats", False))


def _check_n(body: Mapping[str, Any]) -> None:
    n = _optional_int(body, "n")
    if n is not None and n != 1:
        raise bad_request("The simulator only supports n=1.", "n")


def _prompt_ids_and_seed(prompt: object) -> tuple[list[int], str]:
    """Token ids and seed text of a completion prompt (text, token ids, or a batch of one)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return text_token_ids(prompt), prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return list(prompt), ",".join(map(str, prompt))
    raise bad_request(
        "prompt must be a non-empty string or list of token ids (batches are not supported).",
        "prompt",
    )


def parse_completion(raw: object, config: SimConfig) -> GenerationRequest:
    body = _require_object(raw)
    if "prompt" not in body:
        raise bad_request("Field required: prompt", "prompt")
    prompt_ids, seed_text = _prompt_ids_and_seed(body["prompt"])
    return _finish_parse("completion", body, config, prompt_ids, seed_text)


def _message_text(message: object, index: int) -> str:
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        raise bad_request(f"messages[{index}] must be an object with a role.", "messages")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, Mapping)]
        return " ".join(p for p in parts if isinstance(p, str))
    raise bad_request(f"messages[{index}].content must be a string or a list.", "messages")


def _check_continue_final(body: Mapping[str, Any], messages: list[Any]) -> None:
    """vLLM's checks of continue_final_message (continue the last, assistant, message in place)
    against add_generation_prompt. The prompt estimate ignores the flags."""
    add = body.get("add_generation_prompt", True)
    continue_final = body.get("continue_final_message", False)
    if not isinstance(add, bool) or not isinstance(continue_final, bool):
        raise bad_request("add_generation_prompt and continue_final_message must be booleans.")
    if add and continue_final:
        raise bad_request(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
        )
    last = messages[-1]
    if continue_final and not (isinstance(last, Mapping) and last.get("role") == "assistant"):
        raise bad_request(
            "Cannot set `continue_final_message` to True when the final message is not from "
            "the assistant.",
            "messages",
        )


def parse_chat(raw: object, config: SimConfig) -> GenerationRequest:
    body = _require_object(raw)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("Field required: messages (a non-empty list).", "messages")
    _check_continue_final(body, messages)
    texts = [_message_text(m, i) for i, m in enumerate(messages)]
    prompt_ids = chat_token_ids((m["role"], t) for m, t in zip(messages, texts, strict=True))
    return _finish_parse("chat", body, config, prompt_ids, "\n".join(texts))


def _finish_parse(
    kind: Kind, body: Mapping[str, Any], config: SimConfig, prompt_ids: list[int], seed_text: str
) -> GenerationRequest:
    prompt_tokens = len(prompt_ids)
    model = _model(body, config)
    _check_n(body)
    stream, include_usage, continuous_usage = _stream_flags(body)
    max_tokens = _max_tokens(body, kind, prompt_tokens, config)
    check_model(model, config)
    return GenerationRequest(
        kind=kind,
        model=model or config.model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        prompt_token_ids=tuple(prompt_ids),
        text_offset=_offset(seed_text),
        continuous_usage=continuous_usage,
        priority=_optional_int(body, "priority") or 0,
    )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


class ResponseBuilder:
    """Builds the bodies and stream chunks of one completion or chat request, as vLLM does."""

    def __init__(self, request: GenerationRequest, request_id: str | None = None) -> None:
        self.request = request
        prefix = "chatcmpl" if request.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{request_id or uuid.uuid4().hex}"
        self.created = int(time.time())
        self._chunk_object = (
            "chat.completion.chunk" if request.kind == "chat" else "text_completion"
        )
        #: Tokens streamed so far (one per token_chunk), for continuous usage stats.
        self._streamed = 0

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.request.model}

    def response(self, text: str, completion_tokens: int, finish_reason: str) -> dict[str, Any]:
        req = self.request
        if req.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "tool_calls": [],
                    "reasoning_content": None,
                },
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
            body = self._envelope("chat.completion")
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
                "prompt_logprobs": None,
            }
            body = self._envelope("text_completion")
        body["choices"] = [choice]
        body["usage"] = usage(req.prompt_tokens, completion_tokens)
        return body

    def preamble_chunks(self) -> list[dict[str, Any]]:
        """Chunks sent before the first token: vLLM's chat stream opens with the role."""
        if self.request.kind != "chat":
            return []
        body = self._envelope(self._chunk_object)
        body["choices"] = [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        if self.request.continuous_usage:
            body["usage"] = usage(self.request.prompt_tokens, 0)
        return [body]

    def token_chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        body = self._envelope(self._chunk_object)
        if self.request.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = None
        body["choices"] = [choice]
        self._streamed += 1
        if self.request.continuous_usage:
            body["usage"] = usage(self.request.prompt_tokens, self._streamed)
        return body

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        body = self._envelope(self._chunk_object)
        body["choices"] = []
        body["usage"] = usage(self.request.prompt_tokens, completion_tokens)
        return body


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    prompt_tokens: int
    encoding_format: Literal["float", "base64"]


def parse_embedding(raw: object, config: SimConfig) -> EmbeddingRequest:
    body = _require_object(raw)
    model = _model(body, config)
    value = body.get("input")
    inputs: list[str]
    tokens = 0
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        inputs = list(value)
    elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        inputs = [",".join(map(str, value))]
        tokens = len(value)
    elif isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        inputs = [",".join(map(str, v)) for v in value]
        tokens = sum(len(v) for v in value)
    else:
        raise bad_request("input must be a string, a list of strings or token ids.", "input")
    if tokens == 0:
        tokens = sum(estimate_text_tokens(text) for text in inputs)
    encoding: Literal["float", "base64"]
    match body.get("encoding_format") or "float":
        case "float":
            encoding = "float"
        case "base64":
            encoding = "base64"
        case _:
            raise bad_request("encoding_format must be 'float' or 'base64'.", "encoding_format")
    check_model(model, config)
    return EmbeddingRequest(model or config.model, tuple(inputs), tokens, encoding)


def embedding_vector(text: str, dim: int) -> list[float]:
    """A unit vector derived from the text: equal inputs give equal vectors."""
    raw: list[float] = []
    counter = 0
    while len(raw) < dim:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        raw.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    vector = raw[:dim]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def embedding_response(request: EmbeddingRequest, dim: int) -> dict[str, Any]:
    data: list[dict[str, Any]] = []
    for index, text in enumerate(request.inputs):
        vector = embedding_vector(text, dim)
        embedding: list[float] | str = vector
        if request.encoding_format == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
        data.append({"index": index, "object": "embedding", "embedding": embedding})
    return {
        "id": f"embd-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": request.model,
        "data": data,
        "usage": usage(request.prompt_tokens, 0),
    }
