"""A continuable stream on its way to the client: relayed, counted, and stitched to its
continuation.

The client only ever holds whole events whose tokens have their text. Partial events are
buffered until their blank line arrives; an event whose tokens produced no text yet (vLLM holds
back the bytes of an unfinished UTF-8 character) is held until text follows. At a break, what
the client holds is exactly ``sent`` tokens and their text. Overview: router.continuation.

CPU: each event of the first replica's stream is matched by one compiled regular expression
against vLLM's own serialization (one C call: text, finish reason, token count and the usage
span; the first event's envelope and the final usage event by patterns of their own); an
event of any other shape is parsed with ``json.loads``. Events of a continuation are always
parsed and rewritten, which is the rare path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from vllm_fleet.router.continuable import Kind, Plan, continuation_body, dumps, token_count

#: Continuations one stream may get: each is another replica dying under the same request.
MAX_CONTINUATIONS = 3
#: Longest incomplete event buffered; a stream without blank lines (not vLLM's SSE) past this
#: is relayed as it comes and can no longer be continued.
MAX_EVENT_BYTES = 1 << 20

_STR = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_TEXT = rb'"(?P<text>[^"\\]*(?:\\.[^"\\]*)*)"'
_SCALAR = rb"(?:null|true|false|-?\d+|" + _STR + rb")"
_CHOICE_END = (
    rb'"logprobs":null,"finish_reason":(?:null|"(?P<finish>[a-z_]+)")'
    rb'(?:,"[a-z_]+":' + _SCALAR + rb")*\}\]"
)
_USAGE = (
    rb'(?P<usage>,"usage":\{"prompt_tokens":(?P<prompt>\d+),"total_tokens":\d+,'
    rb'"completion_tokens":(?P<tokens>\d+)(?:,"[a-z_]+":(?:null|\{[^{}]*\}))*\})'
)
_ENVELOPE_END = rb'(?:,"[a-z_]+":(?:null|' + _STR + rb"))*\}"


#: Where the part of a token event the fast path reads begins. The envelope before it (id,
#: object, created, model) is relayed as it is and not looked at: it cannot contain this
#: sequence, because a quote inside a JSON string is always escaped.
_CHOICES = b',"choices":[{"index":0,'
#: The rest of a token event exactly as vLLM serializes it (pydantic, exclude_unset), with
#: running usage: one choice, text only, no logprobs.
_FAST: Final[Mapping[Kind, re.Pattern[bytes]]] = {
    "chat": re.compile(
        re.escape(_CHOICES) + rb'"delta":\{"content":' + _TEXT + rb"\},"
        + _CHOICE_END + _USAGE + _ENVELOPE_END
    ),
    "completion": re.compile(
        re.escape(_CHOICES) + rb'"text":' + _TEXT + b"," + _CHOICE_END + _USAGE + _ENVELOPE_END
    ),
}  # fmt: skip


#: The envelope of a stream's first event, as vLLM serializes it: read once per stream (id,
#: created and model are what every continuation chunk is stamped with). An id or model with
#: an escape in it does not match: that event is parsed whole.
_ENVELOPE = re.compile(
    rb'data: \{"id":"(?P<id>[^"\\]+)","object":"[a-z_.]+","created":(?P<created>\d+),'
    rb'"model":"(?P<model>[^"\\]+)"' + re.escape(_CHOICES)
)
#: vLLM's first chat event: the role, no text, no tokens yet (groups as in _FAST's).
_ROLE = re.compile(
    re.escape(_CHOICES) + rb'"delta":\{"role":"assistant","content":"(?P<text>)"\},'
    + _CHOICE_END + _USAGE + _ENVELOPE_END
)  # fmt: skip
#: Where the part of the final usage-only event (stream_options.include_usage) that its
#: pattern reads begins (the envelope before it is relayed as it is, as for _CHOICES).
_NO_CHOICES = b',"choices":[]'
_USAGE_ONLY = re.compile(re.escape(_NO_CHOICES) + _USAGE + _ENVELOPE_END)


def fast_match(kind: Kind, event: bytes) -> re.Match[bytes] | None:
    """The fast path's reading of a token event, or None for any other event (parsed whole)."""
    return _read_token(_FAST[kind], event)


def _read_token(
    pattern: re.Pattern[bytes], event: bytes, anchor: bytes = _CHOICES
) -> re.Match[bytes] | None:
    """``pattern`` read from ``anchor`` on, in a data event (None when it does not match)."""
    if not event.startswith(b"data: {"):
        return None
    start = event.find(anchor)
    return pattern.fullmatch(event, start) if start > 0 else None


_CHUNK_OBJECT: Final[Mapping[Kind, str]] = {
    "chat": "chat.completion.chunk",
    "completion": "text_completion",
}
_DONE_EVENT = b"data: [DONE]"


class Spoiled(Exception):
    """The stream so far cannot be continued exactly (the message says why)."""


@dataclass(frozen=True, slots=True)
class Refused:
    """Why a cut stream cannot go on: ``reason`` is a metric label (telemetry's
    CONTINUATION_FAILURES), ``detail`` a line for the log and the client's error event. The
    stitcher refuses for the stream and the limit; router.relay for the request and the
    replicas."""

    reason: Literal["request", "stream", "replica", "limit"]
    detail: str


@dataclass(frozen=True, slots=True)
class Resume:
    """What to do at a break: send ``body`` to another replica, or, when the answer was
    already complete (``body`` is None), write ``tail`` and end the stream."""

    body: bytes | None
    tail: bytes = b""
    sent: int = 0


@dataclass(slots=True)
class Stitcher:
    """Relays one continuable stream across its replicas, as one stream to the client.

    ``feed`` takes upstream bytes and returns the bytes to write to the client; ``end`` the
    bytes left at a clean end; ``resume_at_break`` what to do when the upstream broke; and
    ``next_segment`` switches to relaying a continuation's stream.
    """

    plan: Plan
    #: Tokens whose events (and text) the client has.
    sent: int = 0
    #: Continuations so far (0: still the first replica's stream).
    segment: int = 0
    #: Why the stream can no longer be continued exactly ("" while it can).
    spoiled: str = ""
    _buffer: bytes = b""
    #: Events whose tokens have no text yet, not relayed until text (or the end) follows.
    _held: list[bytes] = field(default_factory=list)
    #: The text of the relayed tokens: str, or the raw JSON string content (bytes) of events
    #: the fast path read, decoded only when a break needs the text.
    _texts: list[str | bytes] = field(default_factory=list)
    #: Tokens of the continuation segments before the current one (usage is per replica).
    _base: int = 0
    _id: str | None = None
    #: The fast path's pattern: set once the first event of the first replica's stream was
    #: read whole (its envelope kept), None before that and for a continuation's events.
    _fast: re.Pattern[bytes] | None = None
    _created: int = 0
    _model: str = ""
    _prompt_tokens: int | None = None
    _role_sent: bool = False
    _finish: str | None = None
    _done: bool = False

    # -- relaying --

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to relay for ``chunk``: whole events only, rewritten as needed.

        Per event of the first replica's stream (one per token), the work is one compiled
        match and a slice that cuts the usage out (a chunk that is one whole event, the usual
        one, is not even split); the text stays bytes until a break needs it
        (``_text_so_far``).
        """
        fast = self._fast
        if fast is not None and not self._buffer and chunk.find(b"\n\n") == len(chunk) - 2:
            # the usual chunk: one whole token event (no split, no list, no join)
            relayed = self._fast_token(fast, chunk[:-2])
            if relayed is not None:
                return relayed
        data = self._buffer + chunk if self._buffer else chunk
        events = data.split(b"\n\n")
        rest = events.pop()
        if not events:
            if len(data) > MAX_EVENT_BYTES:
                self._spoil("an event without an end (not an SSE stream)")
                self._buffer = b""
                return data
            self._buffer = data
            return b""
        self._buffer = rest
        out: list[bytes] = []
        for event in events:
            if not event:
                continue
            # the first event (parsed whole) sets _fast: the events after it, in the same
            # chunk too, take the fast path
            fast = self._fast
            relayed = self._fast_token(fast, event) if fast is not None else None
            if relayed is None:
                self._parsed(event, out)
            else:
                out.append(relayed)
        return b"".join(out)

    def end(self) -> bytes:
        """At a clean end of the upstream stream: what is still held or buffered, as is."""
        rest = b"".join(e + b"\n\n" for e in self._held) + self._buffer
        self._held.clear()
        self._buffer = b""
        return rest

    def _fast_token(self, fast: re.Pattern[bytes], event: bytes) -> bytes | None:
        """A token event of the first replica's stream, read by ``fast`` (fast_match): the
        bytes to relay for it (with any held before it; none while it is held), or None when
        the event is not of that shape (the caller parses it whole)."""
        match = _read_token(fast, event)
        return None if match is None else self._relay_token(match, event)

    def _relay_token(self, match: re.Match[bytes], event: bytes) -> bytes:
        """A token event of the first replica's stream, as read by a fast pattern."""
        raw, finish, tokens = match.group("text", "finish", "tokens")
        if not self.plan.client_continuous:
            start, end = match.span("usage")
            event = event[:start] + event[end:]
        total = int(tokens)  # segment 0: no base
        if not raw and finish is None and (total > self.sent or self._held):
            self._held.append(event)  # its tokens' text is still to come
            return b""
        out = event + b"\n\n"
        if self._held:
            out = b"".join(e + b"\n\n" for e in self._held) + out
            self._held.clear()
        if total > self.sent:
            self.sent = total
        if raw:
            self._texts.append(raw)  # JSON-escaped UTF-8, decoded at a break
        if finish is not None:
            self._finish = finish.decode()
        return out

    def _token(
        self, event: bytes, text: str, tokens: int, finish: str | None, out: list[bytes]
    ) -> None:
        """A relayed token event: ``tokens`` is this segment's running completion count."""
        total = self._base + tokens
        if not text and finish is None and (total > self.sent or self._held):
            self._held.append(event)  # its tokens' text is still to come
            return
        if self._held:
            out.extend(e + b"\n\n" for e in self._held)
            self._held.clear()
        out.append(event + b"\n\n")
        self.sent = max(self.sent, total)
        if text:
            self._texts.append(text)
        if finish is not None:
            self._finish = finish

    def _release(self, event: bytes, out: list[bytes]) -> None:
        """A non-token event: relayed in order, after anything held."""
        if self._held:
            out.extend(e + b"\n\n" for e in self._held)
            self._held.clear()
        out.append(event + b"\n\n")

    def _read_other(self, event: bytes, out: list[bytes]) -> bool:
        """The first replica's first event and its final usage event, read by a match as its
        token events are (True), or False for an event to parse whole.

        The first event's envelope (id, created, model) and prompt size are what the stream's
        continuations are stamped with; it is a token event, or vLLM's role event for chat.
        """
        if self._fast is None:
            envelope = _ENVELOPE.match(event)
            if envelope is None:
                return False
            start = envelope.end() - len(_CHOICES)
            fast = _FAST[self.plan.kind]
            match = fast.fullmatch(event, start)
            role = match is None and self.plan.kind == "chat"
            if role:
                match = _ROLE.fullmatch(event, start)
            if match is None:
                return False
            try:
                self._id, self._model = envelope["id"].decode(), envelope["model"].decode()
            except UnicodeDecodeError:
                return False  # parsed whole: spoils the stream
            self._created, self._prompt_tokens = int(envelope["created"]), int(match["prompt"])
            self._fast = fast
            self._role_sent = role
            relayed = self._relay_token(match, event)
            if relayed:
                out.append(relayed)
            return True
        if _read_token(_USAGE_ONLY, event, _NO_CHOICES) is None:
            return False
        if self.plan.client_usage:
            self._release(event, out)
        return True

    def _parsed(self, event: bytes, out: list[bytes]) -> None:
        """Any event the fast path did not take: parsed, checked, rewritten when needed."""
        if self.segment == 0 and self._read_other(event, out):
            return
        if not event.startswith(b"data:"):
            self._release(event, out)  # a comment or another SSE field: relayed as is
            return
        payload = event[5:].strip()
        if payload == b"[DONE]":
            self._done = True
            self._release(_DONE_EVENT, out)
            return
        try:
            chunk = json.loads(payload)
            if not isinstance(chunk, dict):
                raise Spoiled("an event that is not a JSON object")
            relayed = self._check(chunk)
        except (ValueError, Spoiled) as exc:
            self._spoil(str(exc) if isinstance(exc, Spoiled) else "an event that is not JSON")
            self._release(event, out)
            return
        if relayed is None:
            return
        rewritten, text, tokens, finish = relayed
        if rewritten is not None:
            event = b"data: " + dumps(rewritten)
        if tokens is None:
            self._release(event, out)
        else:
            self._token(event, text, tokens, finish, out)

    def _check(
        self, chunk: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, str, int | None, str | None] | None:
        """(rewritten chunk or None to relay the bytes as they are, text, running tokens of
        this segment or None for a chunk without tokens, finish reason), or None to drop it."""
        if "error" in chunk:
            raise Spoiled("the replica sent an error event")
        choices = chunk.get("choices")
        usage = chunk.get("usage")
        tokens = token_count(usage.get("completion_tokens")) if isinstance(usage, dict) else None
        if self._id is None:
            self._remember(chunk, usage)
        rewrite = self.segment > 0
        if choices == []:  # the final usage chunk
            if not self.plan.client_usage:
                return None
            return (self._stamped(chunk, tokens) if rewrite else None), "", None, None
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            raise Spoiled("a chunk with other than one choice")
        choice = choices[0]
        if choice.get("index", 0) != 0 or choice.get("logprobs") is not None:
            raise Spoiled("a chunk with another choice or logprobs")
        text, role = self._text(choice)
        if tokens is None:
            raise Spoiled("a chunk without a running token count (continuous_usage_stats)")
        finish = choice.get("finish_reason")
        if finish is not None and not isinstance(finish, str):
            raise Spoiled("a chunk with an odd finish_reason")
        if role is not None:
            if self._role_sent and rewrite:
                del choice["delta"]["role"]
                if not text and finish is None:
                    return None  # the continuation's own role chunk
            self._role_sent = True
        if rewrite:
            chunk = self._stamped(chunk, tokens)
        elif "usage" not in chunk or self.plan.client_continuous:
            return None, text, tokens, finish  # the first replica's bytes, as they are
        if not self.plan.client_continuous:
            chunk = {k: v for k, v in chunk.items() if k != "usage"}
        return chunk, text, tokens, finish

    def _text(self, choice: dict[str, Any]) -> tuple[str, str | None]:
        if self.plan.kind == "completion":
            text = choice.get("text")
            role = None
        else:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                raise Spoiled("a chat chunk without a delta")
            extra = [k for k, v in delta.items() if k not in ("role", "content") and v]
            if extra:
                raise Spoiled(f"a chat chunk with {', '.join(extra)}")
            text = delta.get("content") or ""
            role = delta.get("role")
        if not isinstance(text, str):
            raise Spoiled("a chunk whose text is not a string")
        return text, role

    def _remember(self, chunk: dict[str, Any], usage: Any) -> None:
        """The envelope of the first chunk: every continuation chunk gets the same."""
        ident, created, model = (
            chunk.get("id"),
            token_count(chunk.get("created")),
            chunk.get("model"),
        )
        if not isinstance(ident, str) or created is None or not isinstance(model, str):
            raise Spoiled("a first chunk without id, created and model")
        self._id, self._created, self._model = ident, created, model
        if self.segment == 0:
            self._fast = _FAST[self.plan.kind]
        if isinstance(usage, dict):
            self._prompt_tokens = token_count(usage.get("prompt_tokens"))

    def _stamped(self, chunk: dict[str, Any], tokens: int | None) -> dict[str, Any]:
        """A continuation chunk made to look like the first replica's: envelope and usage."""
        chunk = {**chunk, "id": self._id, "created": self._created, "model": self._model}
        usage = chunk.get("usage")
        if isinstance(usage, dict) and tokens is not None and self._prompt_tokens is not None:
            done = self._base + tokens
            chunk["usage"] = {
                **usage,
                "prompt_tokens": self._prompt_tokens,
                "completion_tokens": done,
                "total_tokens": self._prompt_tokens + done,
            }
            for detail in ("prompt_tokens_details", "completion_tokens_details"):
                if usage.get(detail) is not None:
                    chunk["usage"][detail] = None  # per replica; no longer true of the whole
        return chunk

    def _spoil(self, why: str) -> None:
        if not self.spoiled:
            self.spoiled = why

    # -- breaking and resuming --

    def resume_at_break(self) -> Resume | Refused:
        """At a break: the continuation to send, or the whole end of an answer that was already
        complete, or why the stream cannot go on exactly. Held and partial events are dropped
        (the client never saw them; their tokens are generated again)."""
        self._held.clear()
        self._buffer = b""
        if self._done:
            return Resume(None)
        if self.spoiled:
            return Refused("stream", self.spoiled)
        if self.segment >= MAX_CONTINUATIONS:
            return Refused("limit", f"the stream was already continued {self.segment} times")
        if self._finish is not None or self.sent >= self.plan.limit:
            return Resume(None, self._tail(), self.sent)
        text = self._text_so_far()
        if text is None:
            return Refused("stream", "a chunk whose text is not valid UTF-8")
        return Resume(continuation_body(self.plan, text, self.sent), sent=self.sent)

    def _text_so_far(self) -> str | None:
        """The text the client holds, or None when a chunk's text is not valid UTF-8."""
        parts: list[str] = []
        for piece in self._texts:
            if isinstance(piece, str):
                parts.append(piece)
                continue
            try:
                parts.append(
                    piece.decode() if b"\\" not in piece else json.loads(b'"' + piece + b'"')
                )
            except ValueError:
                return None
        return "".join(parts)

    def next_segment(self) -> None:
        """A continuation's stream starts: its usage counts from zero again."""
        self.segment += 1
        self._fast = None
        self._base = self.sent
        self._buffer = b""

    def _tail(self) -> bytes:
        """The end of an answer whose tokens were all sent: finish chunk, usage, [DONE]."""
        events: list[dict[str, Any]] = []
        envelope = {
            "id": self._id,
            "object": _CHUNK_OBJECT[self.plan.kind],
            "created": self._created,
            "model": self._model,
        }
        if self._finish is None:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
            if self.plan.kind == "chat":
                choice["delta"] = {"content": ""}
            else:
                choice["text"] = ""
            events.append({**envelope, "choices": [choice]})
        if self.plan.client_usage and self._prompt_tokens is not None:
            usage = {
                "prompt_tokens": self._prompt_tokens,
                "total_tokens": self._prompt_tokens + self.sent,
                "completion_tokens": self.sent,
            }
            events.append({**envelope, "choices": [], "usage": usage})
        self._done = True
        return b"".join(b"data: " + dumps(e) + b"\n\n" for e in events) + _DONE_EVENT + b"\n\n"
