"""vllm_fleet.router.continuation: which requests can be continued, the continuation's body, and the
Stitcher that relays, counts and stitches the events (no I/O).

The events are built exactly as vLLM 0.32 serializes them (key order, compact separators,
``exclude_unset``), checked against a stream captured from real vLLM: the fast path must take
the token events, or the CPU figure in docs/reliability.md would not hold.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from multidict import CIMultiDict

from vllm_fleet.router import stitcher as stitcher_module
from vllm_fleet.router.balancer import RequestInfo
from vllm_fleet.router.continuable import Kind, Plan, continuation_body, plan_for, upstream_body
from vllm_fleet.router.continuation import prepare
from vllm_fleet.router.stitcher import (
    MAX_CONTINUATIONS,
    MAX_EVENT_BYTES,
    Refused,
    Resume,
    Stitcher,
    fast_match,
)

#: Two events of a real vLLM 0.32 chat stream (tiny model) with continuous usage stats.
REAL_CHAT_ROLE = (
    b'data: {"id":"chatcmpl-9814f3c3f42e41c9","object":"chat.completion.chunk",'
    b'"created":1796247797,"model":"tiny-llama","choices":[{"index":0,"delta":{"role":'
    b'"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens"'
    b':10,"total_tokens":10,"completion_tokens":0,"completion_tokens_details":null},'
    b'"prompt_token_ids":null,"prompt_text":null}'
)
REAL_CHAT_TOKEN = (
    b'data: {"id":"chatcmpl-9814f3c3f42e41c9","object":"chat.completion.chunk",'
    b'"created":1796247797,"model":"tiny-llama","choices":[{"index":0,"delta":{"content":"ac"},'
    b'"logprobs":null,"finish_reason":null,"token_ids":null}],"usage":{"prompt_tokens":10,'
    b'"total_tokens":11,"completion_tokens":1,"completion_tokens_details":null}}'
)
REAL_COMPLETION_TOKEN = (
    b'data: {"id":"cmpl-92e63538756378e7","object":"text_completion","created":1796247798,'
    b'"model":"tiny-llama","choices":[{"index":0,"text":"\\u001f","logprobs":null,'
    b'"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}],'
    b'"usage":{"prompt_tokens":5,"total_tokens":7,"completion_tokens":2}}'
)


class Upstream:
    """Events of one vLLM stream (one replica), serialized the way vLLM does."""

    def __init__(
        self, kind: Kind, ident: str, created: int = 1000, prompt: int = 10, model: str = "m"
    ) -> None:
        self.kind, self.id, self.created, self.prompt, self.model = (
            kind,
            ident,
            created,
            prompt,
            model,
        )
        self.tokens = 0

    def _envelope(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _usage(self, details: bool = True) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt,
            "total_tokens": self.prompt + self.tokens,
            "completion_tokens": self.tokens,
        }
        if details and self.kind == "chat":
            usage["completion_tokens_details"] = None
        return usage

    def role(self) -> bytes:
        chunk = self._envelope()
        chunk["choices"] = [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        chunk["usage"] = self._usage()
        chunk["prompt_token_ids"] = None
        chunk["prompt_text"] = None
        return _event(chunk)

    def token(self, text: str, count: int = 1, finish: str | None = None) -> bytes:
        self.tokens += count
        chunk = self._envelope()
        choice: dict[str, Any]
        if self.kind == "chat":
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None}
            choice["finish_reason"] = finish
            if finish is not None:
                choice["stop_reason"] = None
            choice["token_ids"] = None
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            choice |= {"stop_reason": None, "prompt_token_ids": None, "token_ids": None}
        chunk["choices"] = [choice]
        chunk["usage"] = self._usage()
        return _event(chunk)

    def usage(self) -> bytes:
        chunk = self._envelope() | {"choices": [], "usage": self._usage(details=False)}
        chunk["system_fingerprint"] = "vllm-0.32.0"
        return _event(chunk)


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode()


DONE = b"data: [DONE]"


def sse(*events: bytes) -> bytes:
    return b"".join(e + b"\n\n" for e in events)


def chunks_of(relayed: bytes) -> list[Any]:
    """The data of every event: parsed JSON, or the string [DONE]."""
    out: list[Any] = []
    for event in relayed.split(b"\n\n"):
        if event:
            assert event.startswith(b"data: "), event
            data = event[6:]
            out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def plan(kind: Kind = "completion", **extra: Any) -> Plan:
    payload: dict[str, Any] = {"model": "m", "stream": True, "max_tokens": 8}
    if kind == "completion":
        payload["prompt"] = "Once upon"
    else:
        payload["messages"] = [{"role": "user", "content": "hi"}]
    payload.update(extra)
    result = plan_for(kind, payload)
    assert isinstance(result, Plan), result
    return result


def text_of(chunks: list[Any]) -> str:
    parts = []
    for chunk in chunks:
        if isinstance(chunk, dict) and chunk.get("choices"):
            choice = chunk["choices"][0]
            parts.append(
                choice["delta"].get("content", "") if "delta" in choice else choice["text"]
            )
    return "".join(parts)


# -- which requests ------------------------------------------------------------------------


def test_a_plain_stream_is_continuable_with_its_limit_and_usage_wishes() -> None:
    p = plan("chat", max_completion_tokens=5, stream_options={"include_usage": True})
    assert (p.limit, p.client_usage, p.client_continuous) == (5, True, False)
    assert plan("completion", prompt=["one prompt"], temperature=0.7, ignore_eos=True).limit == 8
    both = {"include_usage": True, "continuous_usage_stats": True}
    assert plan("completion", stream_options=both).client_continuous


@pytest.mark.parametrize(
    ("kind", "extra", "why"),
    [
        ("completion", {"n": 2}, "n=2"),
        ("completion", {"n": True}, "n=true"),
        ("completion", {"logprobs": 0}, "logprobs=0"),
        ("chat", {"logprobs": True}, "logprobs=true"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools="),
        ("chat", {"tool_choice": "auto"}, "tool_choice="),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format="),
        ("completion", {"best_of": 2}, "best_of=2"),
        ("completion", {"echo": True}, "echo=true"),
        ("completion", {"guided_json": {"type": "object"}}, "'guided_json'"),
        ("chat", {"structured_outputs": {"regex": "a+"}}, "'structured_outputs'"),
        ("completion", {"stop": ["\n"]}, "stop="),
        ("completion", {"seed": 7}, "seed=7"),
        ("chat", {"frequency_penalty": 0.5}, "frequency_penalty=0.5"),
        ("completion", {"prompt": [1, 2, 3]}, "text prompt"),
        ("completion", {"prompt": ["a", "b"]}, "text prompt"),
        ("completion", {"max_tokens": None}, "max_tokens must be set"),
        ("chat", {"continue_final_message": True}, "continue_final_message=true"),
        ("chat", {"stream_options": {"include_usage": True, "x": 1}}, "unknown fields"),
        ("completion", {"suffix": "end"}, "'suffix'"),
    ],
)
def test_requests_that_cannot_be_continued_exactly_say_why(
    kind: Kind, extra: dict[str, Any], why: str
) -> None:
    payload: dict[str, Any] = {"model": "m", "stream": True, "max_tokens": 8}
    payload |= {"prompt": "p"} if kind == "completion" else {"messages": [{"role": "user"}]}
    payload.update(extra)
    refusal = plan_for(kind, payload)
    assert isinstance(refusal, str) and why in refusal, refusal


def test_harmless_defaults_do_not_prevent_a_continuation() -> None:
    p = plan(
        "chat",
        n=1,
        logprobs=False,
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        stop=[],
        seed=None,
        presence_penalty=0.0,
        add_generation_prompt=True,
    )
    assert p.kind == "chat"


def test_prepare_picks_only_streams_of_completions_and_chat() -> None:
    headers: CIMultiDict[str] = CIMultiDict()
    body = json.dumps({"model": "m", "prompt": "p", "max_tokens": 4, "stream": True}).encode()
    stream = RequestInfo(model="m", stream=True)
    assert prepare("/v1/embeddings", stream, headers, body) == (body, None)
    assert prepare("/v1/completions", RequestInfo(model="m"), headers, body) == (body, None)
    sent, cont = prepare("/v1/completions?x=1", stream, headers, body)
    assert cont is not None and cont.stitcher is not None
    assert json.loads(sent)["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }
    refused = json.dumps({"model": "m", "prompt": "p", "max_tokens": 4, "stream": True, "n": 2})
    sent, cont = prepare("/v1/completions", stream, headers, refused.encode())
    assert sent == refused.encode()  # forwarded untouched
    assert cont is not None and cont.stitcher is None and "n=2" in cont.refusal


# -- bodies --------------------------------------------------------------------------------------


def test_the_first_body_asks_for_running_counts_without_re_encoding_the_prompt() -> None:
    body = b'{"model": "m", "prompt": "caf\\u00e9", "max_tokens": 4, "stream": true}\n'
    p = plan("completion", prompt="café", max_tokens=4)
    sent = upstream_body(p, body)
    assert sent.startswith(b'{"model": "m", "prompt": "caf\\u00e9"')  # spliced, not re-encoded
    assert json.loads(sent)["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }
    own = plan("completion", stream_options={"include_usage": True})
    assert json.loads(upstream_body(own, b"{}"))["stream_options"]["continuous_usage_stats"]


def test_the_clients_own_stream_options_are_swapped_in_place_only_when_found_for_sure() -> None:
    body = (
        b'{"model": "m", "prompt": "caf\\u00e9", "max_tokens": 4, "stream": true, '
        b'"stream_options": {"include_usage": true}}'
    )
    own = plan("completion", prompt="café", max_tokens=4, stream_options={"include_usage": True})
    sent = upstream_body(own, body)
    assert sent == (
        b'{"model": "m", "prompt": "caf\\u00e9", "max_tokens": 4, "stream": true, '
        b'"stream_options": {"include_usage":true,"continuous_usage_stats":true}}'
    )
    # a second member of that name (here in a chat's metadata): re-encoded, the metadata kept
    chat = plan(
        "chat",
        metadata={"stream_options": {"include_usage": True}},
        stream_options={"include_usage": True},
    )
    raw = json.dumps(dict(chat.payload)).encode()
    sent = upstream_body(chat, raw)
    assert json.loads(sent)["metadata"] == {"stream_options": {"include_usage": True}}
    assert json.loads(sent)["stream_options"]["continuous_usage_stats"] is True


def test_a_completion_continues_from_its_prompt_plus_the_text_sent() -> None:
    p = plan("completion", max_tokens=10, min_tokens=6)
    body = json.loads(continuation_body(p, " there was", 4))
    assert body["prompt"] == "Once upon there was"
    assert (body["max_tokens"], body["min_tokens"]) == (6, 2)
    listed = plan("completion", prompt=["Once"], max_tokens=10)
    assert json.loads(continuation_body(listed, " more", 9))["prompt"] == ["Once more"]
    assert p.payload["prompt"] == "Once upon"  # the plan itself is never changed


def test_a_chat_continues_the_partial_assistant_message_in_place() -> None:
    p = plan("chat", max_tokens=10, max_completion_tokens=8)
    body = json.loads(continuation_body(p, "Hello wor", 3))
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello wor"}
    assert body["messages"][:-1] == [{"role": "user", "content": "hi"}]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert (body["max_tokens"], body["max_completion_tokens"]) == (5, 5)  # limit 8 minus 3
    assert body["stream_options"]["continuous_usage_stats"] is True


def test_with_nothing_sent_the_continuation_is_the_original_request() -> None:
    p = plan("chat")
    body = json.loads(continuation_body(p, "", 0))
    assert body == {**p.payload, "stream_options": body["stream_options"]}


# -- relaying ----------------------------------------------------------------------------------


def test_vllm_token_events_take_the_fast_path() -> None:
    assert fast_match("chat", REAL_CHAT_TOKEN)
    assert fast_match("completion", REAL_COMPLETION_TOKEN)
    assert fast_match("chat", Upstream("chat", "a").token("x"))
    assert fast_match("completion", Upstream("completion", "a").token("x", finish="length"))
    assert not fast_match("chat", REAL_CHAT_ROLE)  # the first event has a pattern of its own
    assert not fast_match("completion", b": " + REAL_COMPLETION_TOKEN[6:])  # not a data line


def test_vllm_first_and_usage_events_are_read_without_parsing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The role event and the final usage event take a match too (issue 18: they were
    parsed and re-encoded, ~30 us of a 16-token answer); what the client gets and what a
    continuation is stamped with are the same as when they are parsed."""
    usage = (
        b'data: {"id":"chatcmpl-9814f3c3f42e41c9","object":"chat.completion.chunk",'
        b'"created":1796247797,"model":"tiny-llama","choices":[],"usage":{"prompt_tokens":10,'
        b'"total_tokens":11,"completion_tokens":1}}'
    )
    stream = sse(REAL_CHAT_ROLE, REAL_CHAT_TOKEN, usage, DONE)
    never = re.compile(b"(?!)")
    monkeypatch.setattr(stitcher_module, "_ENVELOPE", never)
    monkeypatch.setattr(stitcher_module, "_USAGE_ONLY", never)
    parsed = Stitcher(plan("chat", stream_options={"include_usage": True}))
    expected = parsed.feed(stream)
    monkeypatch.undo()

    def no_parsing(_: bytes) -> None:
        raise AssertionError("parsed")

    monkeypatch.setattr(json, "loads", no_parsing)
    matched = Stitcher(plan("chat", stream_options={"include_usage": True}))
    relayed = b"".join(matched.feed(e + b"\n\n") for e in stream.split(b"\n\n")[:3])
    monkeypatch.undo()
    assert relayed + matched.feed(DONE + b"\n\n") == expected
    assert expected.count(b'"usage"') == 1 and expected.count(b'"role"') == 1
    for name in ("_id", "_created", "_model", "_prompt_tokens", "_role_sent", "sent"):
        assert getattr(matched, name) == getattr(parsed, name), name
    assert (matched._id, matched._created, matched._model) == (
        "chatcmpl-9814f3c3f42e41c9",
        1796247797,
        "tiny-llama",
    )


def test_a_first_event_with_an_escaped_model_name_is_parsed_whole() -> None:
    up = Upstream("chat", "chatcmpl-1", model='m"1')
    stitcher = Stitcher(plan("chat"))
    stitcher.feed(sse(up.role(), up.token("a")))
    assert stitcher._model == 'm"1' and stitcher.sent == 1 and not stitcher.spoiled


def test_usage_the_client_did_not_ask_for_is_cut_out_and_nothing_else_changes() -> None:
    up = Upstream("chat", "chatcmpl-1")
    stream = sse(up.role(), up.token("Hel"), up.token('lo "x"\\', 2), up.usage(), DONE)
    stitcher = Stitcher(plan("chat"))
    relayed = stitcher.feed(stream)
    chunks = chunks_of(relayed)
    assert [c == "[DONE]" or "usage" in c for c in chunks] == [False, False, False, True]
    assert text_of(chunks) == 'Hello "x"\\'
    assert stitcher.sent == 3
    for original, kept in zip(stream.split(b"\n\n")[1:3], relayed.split(b"\n\n")[1:3], strict=True):
        cut = json.loads(original[6:])
        del cut["usage"]
        assert json.loads(kept[6:]) == cut


def test_a_client_that_asked_for_usage_gets_the_final_usage_chunk_only() -> None:
    up = Upstream("completion", "cmpl-1")
    stitcher = Stitcher(plan("completion", stream_options={"include_usage": True}))
    chunks = chunks_of(stitcher.feed(sse(up.token("a"), up.token("b"), up.usage(), DONE)))
    assert ["usage" in c for c in chunks[:3]] == [False, False, True]
    assert chunks[2]["usage"]["completion_tokens"] == 2


def test_a_client_that_asked_for_continuous_usage_gets_the_bytes_unchanged() -> None:
    up = Upstream("chat", "chatcmpl-1")
    stream = sse(up.role(), up.token("a"), up.token("b", finish="stop"), up.usage(), DONE)
    options = {"include_usage": True, "continuous_usage_stats": True}
    assert Stitcher(plan("chat", stream_options=options)).feed(stream) == stream


def test_events_cut_anywhere_are_relayed_whole() -> None:
    up = Upstream("chat", "chatcmpl-1")
    stream = sse(up.role(), up.token("one"), up.token(" two"), up.usage(), DONE)
    whole = Stitcher(plan("chat")).feed(stream)
    stitcher = Stitcher(plan("chat"))
    pieces = [stitcher.feed(stream[i : i + 7]) for i in range(0, len(stream), 7)]
    assert all(p.endswith(b"\n\n") for p in pieces if p)  # never half an event
    assert b"".join(pieces) + stitcher.end() == whole


def test_one_event_per_chunk_relays_and_counts_what_the_whole_stream_does() -> None:
    """vLLM's usual read is one token event: the stitcher's shortcut for it must agree with
    the general path, held events and the text kept for a break included."""
    up = Upstream("chat", "chatcmpl-1")
    events = [up.role(), up.token("a"), up.token(""), up.token("é", 2), up.token('"q"\\', 1)]
    whole = Stitcher(plan("chat"))
    relayed_whole = whole.feed(sse(*events))
    one_by_one = Stitcher(plan("chat"))
    relayed = b"".join(one_by_one.feed(sse(event)) for event in events)
    assert relayed == relayed_whole
    assert one_by_one.sent == whole.sent == 5
    assert one_by_one.resume_at_break() == whole.resume_at_break()


def test_tokens_are_counted_from_usage_not_from_chunks() -> None:
    up = Upstream("completion", "cmpl-1")
    stitcher = Stitcher(plan("completion", max_tokens=20))
    stitcher.feed(sse(up.token("a b c", 3), up.token(" d e f g", 4)))
    assert stitcher.sent == 7


def test_tokens_without_text_yet_are_held_until_their_text_comes() -> None:
    up = Upstream("completion", "cmpl-1")
    stitcher = Stitcher(plan("completion"))
    assert stitcher.feed(sse(up.token("a"))) != b""
    assert stitcher.feed(sse(up.token(""))) == b""  # bytes of a character still incomplete
    assert stitcher.sent == 1
    relayed = stitcher.feed(sse(up.token("é")))
    assert text_of(chunks_of(relayed)) == "é" and len(chunks_of(relayed)) == 2
    assert stitcher.sent == 3


def test_garbage_is_relayed_as_it_came_and_spoils_the_continuation() -> None:
    stitcher = Stitcher(plan("completion"))
    garbage = b"data: {not json\n\n\x00\xff\xfe junk\n"
    assert stitcher.feed(garbage) + stitcher.end() == garbage
    assert stitcher.resume_at_break() == Refused("stream", "an event that is not JSON")


def test_a_stream_without_blank_lines_is_relayed_after_a_bound() -> None:
    stitcher = Stitcher(plan("completion"))
    assert stitcher.feed(b"x" * MAX_EVENT_BYTES) == b""
    assert len(stitcher.feed(b"yy")) == MAX_EVENT_BYTES + 2
    assert isinstance(stitcher.resume_at_break(), Refused)


# -- breaking and stitching ----------------------------------------------------------------------


def test_a_chat_stream_cut_and_continued_reads_as_one_answer() -> None:
    first = Upstream("chat", "chatcmpl-first", created=111, prompt=10)
    stitcher = Stitcher(plan("chat", max_tokens=6, stream_options={"include_usage": True}))
    before = stitcher.feed(sse(first.role(), first.token("Hello"), first.token(" wor", 2)))
    before += stitcher.feed(first.token("ld")[:40])  # half an event when the replica died
    resume = stitcher.resume_at_break()
    assert isinstance(resume, Resume) and resume.body is not None and resume.sent == 3
    body = json.loads(resume.body)
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello wor"}
    assert body["max_tokens"] == 3
    stitcher.next_segment()
    second = Upstream("chat", "chatcmpl-second", created=222, prompt=14, model="m")
    after = stitcher.feed(
        sse(second.role(), second.token("ld"), second.token("!!", 2, "length"), second.usage())
    )
    after += stitcher.feed(sse(DONE)) + stitcher.end()
    chunks = chunks_of(before + after)
    data = [c for c in chunks if c != "[DONE]"]
    assert {c["id"] for c in data} == {"chatcmpl-first"}
    assert {c["created"] for c in data} == {111}
    roles = [c for c in data if c["choices"] and "role" in c["choices"][0]["delta"]]
    assert len(roles) == 1
    assert text_of(chunks) == "Hello world!!"
    assert data[-1]["choices"] == [] and data[-1]["usage"] == {
        "prompt_tokens": 10,
        "total_tokens": 16,
        "completion_tokens": 6,
    }
    assert [c for c in data[:-1] if "usage" in c] == []
    assert chunks[-1] == "[DONE]" and chunks.count("[DONE]") == 1
    assert data[-2]["choices"][0]["finish_reason"] == "length"


def test_continuous_usage_after_a_break_counts_both_parts() -> None:
    first = Upstream("completion", "cmpl-a", prompt=5)
    options = {"include_usage": True, "continuous_usage_stats": True}
    stitcher = Stitcher(plan("completion", max_tokens=5, stream_options=options))
    stitcher.feed(sse(first.token("a"), first.token("b")))
    resume = stitcher.resume_at_break()
    assert isinstance(resume, Resume) and resume.body is not None
    assert json.loads(resume.body)["prompt"] == "Once uponab"
    stitcher.next_segment()
    second = Upstream("completion", "cmpl-b", prompt=7)
    chunks = chunks_of(stitcher.feed(sse(second.token("c", 2), second.token("d", 1, "length"))))
    assert [c["usage"]["completion_tokens"] for c in chunks] == [4, 5]
    assert {c["usage"]["prompt_tokens"] for c in chunks} == {5}
    assert {c["id"] for c in chunks} == {"cmpl-a"}


def test_a_second_break_continues_from_both_parts() -> None:
    first = Upstream("completion", "cmpl-a")
    stitcher = Stitcher(plan("completion", max_tokens=10))
    stitcher.feed(sse(first.token(" one")))
    assert isinstance(stitcher.resume_at_break(), Resume)
    stitcher.next_segment()
    second = Upstream("completion", "cmpl-b")
    stitcher.feed(sse(second.token(" two", 2)))
    resume = stitcher.resume_at_break()
    assert isinstance(resume, Resume) and resume.body is not None and resume.sent == 3
    body = json.loads(resume.body)
    assert (body["prompt"], body["max_tokens"]) == ("Once upon one two", 7)


def test_held_tokens_are_generated_again_after_a_break() -> None:
    up = Upstream("completion", "cmpl-a")
    stitcher = Stitcher(plan("completion", max_tokens=10))
    stitcher.feed(sse(up.token("x"), up.token("")))
    resume = stitcher.resume_at_break()
    assert isinstance(resume, Resume) and resume.sent == 1 and resume.body is not None
    assert json.loads(resume.body)["max_tokens"] == 9


def test_a_break_after_the_last_token_ends_the_answer_without_a_replica() -> None:
    up = Upstream("chat", "chatcmpl-a", prompt=4)
    stitcher = Stitcher(plan("chat", max_tokens=2, stream_options={"include_usage": True}))
    stitcher.feed(sse(up.role(), up.token("a"), up.token("b", finish="length")))
    resume = stitcher.resume_at_break()
    assert isinstance(resume, Resume) and resume.body is None
    tail = chunks_of(resume.tail)
    assert tail[0]["usage"] == {"prompt_tokens": 4, "total_tokens": 6, "completion_tokens": 2}
    assert tail[0]["id"] == "chatcmpl-a" and tail[1] == "[DONE]"


def test_all_tokens_sent_without_a_finish_gets_a_finish_chunk() -> None:
    up = Upstream("completion", "cmpl-a")
    stitcher = Stitcher(plan("completion", max_tokens=2))
    stitcher.feed(sse(up.token("a", 2)))
    resume = stitcher.resume_at_break()
    assert isinstance(resume, Resume) and resume.body is None
    tail = chunks_of(resume.tail)
    assert tail[0]["choices"][0]["finish_reason"] == "length" and tail[1] == "[DONE]"


def test_a_break_after_done_needs_nothing_more() -> None:
    up = Upstream("completion", "cmpl-a")
    stitcher = Stitcher(plan("completion", max_tokens=1))
    stitcher.feed(sse(up.token("a", 1, "length"), DONE))
    assert stitcher.resume_at_break() == Resume(None)


@pytest.mark.parametrize(
    ("event", "why"),
    [
        (
            b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
            b'"choices":[{"index":0,"delta":{"reasoning":"hmm"},"logprobs":null,'
            b'"finish_reason":null}],"usage":{"prompt_tokens":1,"total_tokens":2,'
            b'"completion_tokens":1}}',
            "reasoning",
        ),
        (b'data: {"error":{"message":"boom","code":500}}', "error event"),
        (
            b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
            b'"choices":[{"index":0,"delta":{"content":"a"},"logprobs":null,'
            b'"finish_reason":null}]}',
            "running token count",
        ),
    ],
)
def test_streams_that_cannot_go_on_exactly_say_why(event: bytes, why: str) -> None:
    stitcher = Stitcher(plan("chat"))
    assert stitcher.feed(sse(event)) == sse(event)  # relayed all the same
    refusal = stitcher.resume_at_break()
    assert isinstance(refusal, Refused) and refusal.reason == "stream" and why in refusal.detail


def test_a_stream_is_continued_a_bounded_number_of_times() -> None:
    stitcher = Stitcher(plan("completion", max_tokens=100))
    for i in range(MAX_CONTINUATIONS):
        up = Upstream("completion", f"cmpl-{i}")
        stitcher.feed(sse(up.token("a")))
        assert isinstance(stitcher.resume_at_break(), Resume)
        stitcher.next_segment()
    assert stitcher.resume_at_break() == Refused(
        "limit", f"the stream was already continued {MAX_CONTINUATIONS} times"
    )
