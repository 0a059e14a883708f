"""Streams that survive their replica: continue a cut stream on another replica, exactly.

When a replica dies in the middle of a completion stream, the client already holds part of
the answer. Instead of ending the stream with an error, the router asks another replica for
the rest: for ``/v1/completions`` the prompt plus the text already streamed, for chat the
messages plus the partial assistant message (vLLM's ``continue_final_message: true`` and
``add_generation_prompt: false``), with ``max_tokens`` reduced by the tokens already sent. The
new stream is stitched onto the client's: the same ``id``, ``created`` and ``model`` in every
chunk, no second role delta, and a final ``usage`` that counts both parts.

Exactness rests on three rules, each enforced here:

- Only requests whose answer is a pure function of (prompt, text so far, tokens left) are
  continued: one choice, no logprobs, tools, response formats, guided decoding, stop strings
  (vLLM holds back text that may start one), seeds or output-dependent penalties. Anything not
  on the allow-list below is refused, and the stream keeps today's clean SSE error.
- Tokens are counted, not guessed: the upstream request asks for
  ``stream_options: {include_usage, continuous_usage_stats}``, so every vLLM chunk carries the
  running ``completion_tokens`` (a chunk may hold several tokens). The usage fields the client
  did not ask for are cut out of the chunks before they are relayed.
- The client only ever holds whole events whose tokens have their text. Partial events are
  buffered until their blank line arrives; an event whose tokens produced no text yet (vLLM
  holds back the bytes of an unfinished UTF-8 character) is held until text follows. At a
  break, what the client holds is exactly ``sent`` tokens and their text.

CPU: this runs only for continuable streams (the others are relayed untouched). Each event of
the first replica's stream is matched by one compiled regular expression against vLLM's own
serialization (one C call: text, finish reason, token count and the usage span); an event of
any other shape is parsed with ``json.loads``. Events of a continuation are always parsed and
rewritten, which is the rare path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict

from vllm_fleet.router.balancer import RequestInfo
from vllm_fleet.router.continuable import PATHS, plan_for, upstream_body
from vllm_fleet.router.stitcher import Stitcher


@dataclass(slots=True)
class Continuation:
    """One streaming request that may be re-sent: how to send it, and its Stitcher.

    ``stitcher`` is None when the request cannot be continued (``refusal`` says why): its
    stream is relayed untouched, and a break ends it with the SSE error as before.
    """

    path: str
    headers: CIMultiDict[str]
    info: RequestInfo
    stitcher: Stitcher | None
    refusal: str = ""
    #: Replicas that broke this stream; never asked to continue it.
    broken: list[str] = field(default_factory=list)


def prepare(
    path: str,
    info: RequestInfo,
    headers: CIMultiDict[str],
    body: bytes,
    payload: Mapping[str, Any] | None = None,
) -> tuple[bytes, Continuation | None]:
    """(body to send, Continuation) for a request; None for one that is not a stream of
    completions or chat. ``payload`` is the body as router.parse.parse_body parsed it (parsed
    again here when not given)."""
    kind = PATHS.get(path.partition("?")[0])
    if kind is None or not info.stream:
        return body, None
    if payload is None:
        payload = json.loads(body)  # parse_request already proved it is a JSON object
    plan = plan_for(kind, payload)
    if isinstance(plan, str):
        return body, Continuation(path, headers, info, None, plan)
    return upstream_body(plan, body), Continuation(path, headers, info, Stitcher(plan))
