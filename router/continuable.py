"""Which streaming requests can be continued exactly, and the bodies that continue them.

Only requests whose answer is a pure function of (prompt, text so far, tokens left) are
continued: one choice, no logprobs, tools, response formats, guided decoding, stop strings
(vLLM holds back text that may start one), seeds or output-dependent penalties. Anything not on
the allow-list below is refused, and the stream keeps the clean SSE error. The upstream request
asks for ``stream_options: {include_usage, continuous_usage_stats}`` so every vLLM chunk carries
the running ``completion_tokens`` (router.stitcher counts with it). Overview: router.continuation.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

Kind = Literal["completion", "chat"]

#: Paths (before any query string) whose streams can be continued, and their kind.
PATHS: Final[Mapping[str, Kind]] = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
#: What the router asks every continuable upstream stream for (exact running token counts).
UPSTREAM_STREAM_OPTIONS: Final[Mapping[str, bool]] = {
    "include_usage": True,
    "continuous_usage_stats": True,
}

_ANY = object()
#: Parameters a continuation carries over unchanged: the answer does not depend on where it
#: was cut. Values listed are the only ones accepted (``_ANY``: any value).
_COMMON: Final[Mapping[str, Any]] = {
    "model": _ANY,
    "stream": (True,),
    "stream_options": _ANY,  # checked on its own
    "max_tokens": _ANY,  # checked on its own
    "temperature": _ANY,
    "top_p": _ANY,
    "top_k": _ANY,
    "min_p": _ANY,
    # repetition_penalty counts prompt and output tokens alike, so moving the streamed text
    # into the prompt keeps it the same; presence and frequency penalties count output tokens
    # only and would forget the streamed part.
    "repetition_penalty": _ANY,
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "ignore_eos": _ANY,
    "min_tokens": _ANY,  # reduced by the tokens sent
    "stop": (None, "", ()),
    "stop_token_ids": _ANY,
    "include_stop_str_in_output": _ANY,
    "n": (None, 1),
    "seed": (None,),
    "user": _ANY,
    "skip_special_tokens": _ANY,
    "spaces_between_special_tokens": _ANY,
    "add_special_tokens": _ANY,
    "priority": _ANY,
    "request_id": _ANY,
    "cache_salt": _ANY,
    "logit_bias": _ANY,
    "allowed_token_ids": _ANY,
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
}
_ALLOWED: Final[Mapping[Kind, Mapping[str, Any]]] = {
    "completion": {
        **_COMMON,
        "prompt": _ANY,  # checked on its own
        "logprobs": (None,),
        "best_of": (None, 1),
    },
    "chat": {
        **_COMMON,
        "messages": _ANY,  # checked on its own
        "max_completion_tokens": _ANY,
        "logprobs": (None, False),
        "top_logprobs": (None, 0),
        "tools": (None, ()),
        "tool_choice": (None, "none"),
        "parallel_tool_calls": _ANY,
        "add_generation_prompt": (None, True),
        "continue_final_message": (None, False),
        "chat_template": _ANY,
        "chat_template_kwargs": _ANY,
        "documents": (None,),
        "store": _ANY,
        "metadata": _ANY,
    },
}


@dataclass(frozen=True, slots=True)
class Plan:
    """A request that can be continued: its parsed body and what the client asked to see."""

    kind: Kind
    #: The client's request body, parsed (never modified).
    payload: Mapping[str, Any]
    #: Tokens the whole answer may have (max_completion_tokens, else max_tokens).
    limit: int
    #: ``stream_options.include_usage``: a final usage chunk.
    client_usage: bool
    #: ``stream_options.continuous_usage_stats`` (with include_usage): usage in every chunk.
    client_continuous: bool


def _listed(value: Any, allowed: Any) -> bool:
    """``value`` is one of ``allowed`` (same type: ``True`` is not ``1``), or [] for ()."""
    if allowed is _ANY:
        return True
    if value == [] and () in allowed:
        return True
    return any(type(value) is type(choice) and value == choice for choice in allowed)


def token_count(value: Any) -> int | None:
    """``value`` when it is a token count (an int, not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def plan_for(kind: Kind, payload: Mapping[str, Any]) -> Plan | str:
    """The Plan for a streaming request, or why it cannot be continued exactly (one line)."""
    allowed = _ALLOWED[kind]
    for name, value in payload.items():
        if name not in allowed:
            return f"parameter {name!r} is not known to continue exactly"
        if not _listed(value, allowed[name]):
            return f"{name}={json.dumps(value)[:40]} cannot be continued exactly"
    if kind == "completion":
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return "only a text prompt (or a list of one) can be continued"
        limit = token_count(payload.get("max_tokens"))
    else:
        messages = payload.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return "messages must be a list of objects"
        limit = token_count(payload.get("max_completion_tokens")) or token_count(
            payload.get("max_tokens")
        )
    if limit is None or limit < 1:
        # Without it the replica's default applies, which a model's generation config may
        # set: a continuation could not prove it ends where the whole answer would.
        return "max_tokens must be set for a stream to be continued"
    if "min_tokens" in payload and token_count(payload["min_tokens"]) is None:
        return "min_tokens must be an integer"
    options = payload.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or not set(options) <= set(UPSTREAM_STREAM_OPTIONS):
        return "stream_options has unknown fields"
    usage = options.get("include_usage") is True
    continuous = usage and options.get("continuous_usage_stats") is True
    return Plan(kind, payload, limit, usage, continuous)


def upstream_body(plan: Plan, body: bytes) -> bytes:
    """The first attempt's body: the client's, asking for running token counts.

    Without stream_options in the client's body, the field is spliced in before the closing
    brace (no re-serialization of a possibly large prompt); otherwise the body is re-encoded.
    """
    if "stream_options" not in plan.payload:
        head = body.rstrip()
        if head.endswith(b"}"):
            return head[:-1] + b',"stream_options":' + _OPTIONS_JSON + b"}"
    else:
        spliced = _replace_options(body, plan.payload["stream_options"])
        if spliced is not None:
            return spliced
    payload = dict(plan.payload)
    payload["stream_options"] = dict(UPSTREAM_STREAM_OPTIONS)
    return dumps(payload)


_OPTIONS_JSON = json.dumps(dict(UPSTREAM_STREAM_OPTIONS), separators=(",", ":")).encode()
#: A "stream_options" member whose value is a flat object. Outside JSON strings only (a quote
#: inside one is escaped), so it is a key: the top-level one when it is the only match and
#: holds the parsed body's value.
_OPTIONS_MEMBER = re.compile(rb'"stream_options"\s*:\s*(\{[^{}"]*(?:"[a-z_]*"[^{}"]*)*\})')


def _replace_options(body: bytes, options: Any) -> bytes | None:
    """``body`` with its stream_options value swapped for the router's (re-encoding a long
    prompt costs tens of microseconds), or None when the member cannot be found for sure."""
    found = list(_OPTIONS_MEMBER.finditer(body))
    if len(found) != 1:
        return None
    start, end = found[0].span(1)
    try:
        if json.loads(body[start:end]) != options:
            return None
    except ValueError:
        return None
    return body[:start] + _OPTIONS_JSON + body[end:]


def continuation_body(plan: Plan, text: str, sent: int) -> bytes:
    """The request for the rest of the answer, after ``sent`` tokens whose text is ``text``.

    With nothing sent yet this is the original request (the answer simply starts over).
    """
    payload: dict[str, Any] = copy.deepcopy(dict(plan.payload))
    payload["stream_options"] = dict(UPSTREAM_STREAM_OPTIONS)
    left = plan.limit - sent
    for name in ("max_tokens", "max_completion_tokens"):
        if name in payload:
            payload[name] = left
    if token_count(payload.get("min_tokens")) is not None:
        payload["min_tokens"] = max(0, payload["min_tokens"] - sent)
    if text:
        if plan.kind == "completion":
            prompt = payload["prompt"]
            payload["prompt"] = [prompt[0] + text] if isinstance(prompt, list) else prompt + text
        else:
            payload["messages"] = [*payload["messages"], {"role": "assistant", "content": text}]
            payload["continue_final_message"] = True
            payload["add_generation_prompt"] = False
    return dumps(payload)


def dumps(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
