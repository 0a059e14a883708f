"""Streaming parse and validation of a batch input file.

Two formats, read one line at a time so a file of any length costs the same memory:

- the OpenAI Batch format (what ``vllm run-batch`` reads): one JSON object per line with
  ``custom_id``, ``method`` (POST), ``url`` (a POST route such as ``/v1/chat/completions``) and
  ``body``;
- plain prompts: a text file (one prompt per line) or a JSONL file whose objects carry the
  prompt in ``--field`` (or fill ``--template``'s ``{placeholders}``), turned into chat
  requests for ``--model``. Their ``custom_id`` is ``line-N`` (or the object's ``custom_id``).

A bad line never aborts the batch: it becomes an `InputError` naming its line number, which the
runner writes as one error line. Duplicate ids are the runner's to find: only it knows which
ids an earlier run already finished (`vllm_fleet.launcher.batch.output.ResumeState`).
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

#: Routes a batch line may POST to. vLLM serves these; an unknown route is most often a typo
#: ("/v1/chat/completion"), so it is refused per line rather than sent and 404ed.
KNOWN_URLS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/score",
    "/v1/rerank",
    "/v2/rerank",
    "/v1/classify",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/pooling",
    "/classify",
    "/score",
    "/rerank",
)


@dataclass(frozen=True)
class BatchRequest:
    """One valid input line: what to POST where, and the id its result is filed under."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class InputError:
    """One invalid input line; ``custom_id`` when the line had a usable one."""

    line: int
    custom_id: str | None
    message: str


@dataclass(frozen=True)
class PlainOptions:
    """How plain prompts become chat requests (`--model --system --max-tokens --field
    --template`)."""

    model: str
    system: str | None = None
    max_tokens: int | None = None
    field: str | None = None
    template: str | None = None
    url: str = "/v1/chat/completions"


InputItem = BatchRequest | InputError


def count_lines(path: Path, chunk: int = 1 << 20) -> int:
    """Lines in the file (a last line without a newline counts), for the progress total."""
    count = 0
    last = b"\n"
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line; undecodable bytes are replaced so
    the line fails validation instead of the whole read."""
    with path.open("r", encoding="utf-8", errors="replace", newline="\n") as handle:
        for number, raw in enumerate(handle, start=1):
            text = raw.strip()
            if text:
                yield number, text


def _error(line: int, message: str, custom_id: str | None = None) -> InputError:
    return InputError(line, custom_id, f"line {line}: {message}")


#: msgspec decodes JSON several times faster than the json module (a million lines: seconds
#: instead of tens of seconds); json re-parses what it refuses, for its precise error message
#: (and integers beyond 64 bits, which msgspec does not take).
_DECODER = msgspec.json.Decoder()


def loads(text: str | bytes) -> Any:
    """Parse one JSON document; json.JSONDecodeError when it is not one."""
    try:
        return _DECODER.decode(text)
    except msgspec.DecodeError:
        return json.loads(text)


def validate_openai_line(line: int, text: str, urls: tuple[str, ...] = KNOWN_URLS) -> InputItem:
    """One OpenAI Batch line, checked (all but id uniqueness)."""
    try:
        raw = loads(text)
    except json.JSONDecodeError as exc:
        return _error(line, f"not JSON ({exc.msg} at column {exc.colno}); one object per line")
    if not isinstance(raw, dict):
        return _error(line, "not a JSON object; give {custom_id, method, url, body}")
    custom_id = raw.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _error(line, "custom_id is missing or not a non-empty string; give each line one")
    method = raw.get("method", "POST")
    if method != "POST":
        return _error(line, f"method {method!r} is not supported; use POST", custom_id)
    url = raw.get("url")
    if not isinstance(url, str) or url.split("?", 1)[0] not in urls:
        return _error(line, f"url {url!r} is not a known route; use one of {', '.join(urls)}")
    body = raw.get("body")
    if not isinstance(body, dict):
        return _error(line, "body is missing or not a JSON object", custom_id)
    if body.get("stream"):
        return _error(line, "body.stream is true; batch results are whole responses: drop it")
    return BatchRequest(line, custom_id, url, body)


class _Template(string.Formatter):
    """str.format over a JSON object's fields that names a missing field instead of KeyError."""

    def render(self, template: str, fields: dict[str, Any]) -> str:
        return self.vformat(template, (), fields)


def plain_prompt(text: str, options: PlainOptions) -> tuple[str | None, str]:
    """(custom_id from the object or None, prompt) of one plain-mode line. ValueError says
    what is wrong. A line is JSON only when --field or --template asks for an object."""
    if options.field is None and options.template is None:
        return None, text
    try:
        raw = loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg}); --field/--template read JSON objects") from None
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object; --field/--template read JSON objects")
    custom_id = raw.get("custom_id")
    given = custom_id if isinstance(custom_id, str) and custom_id else None
    if options.template is not None:
        try:
            return given, _Template().render(options.template, raw)
        except (KeyError, IndexError) as exc:
            raise ValueError(f"--template needs field {exc} that this object lacks") from None
    assert options.field is not None
    value = raw.get(options.field)
    if not isinstance(value, str):
        raise ValueError(f"field {options.field!r} is missing or not a string (--field)")
    return given, value


def plain_body(prompt: str, options: PlainOptions) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    if options.system:
        messages.append({"role": "system", "content": options.system})
    messages.append({"role": "user", "content": prompt})
    body: dict[str, Any] = {"model": options.model, "messages": messages}
    if options.max_tokens is not None:
        body["max_tokens"] = options.max_tokens
    return body


def validate_plain_line(line: int, text: str, options: PlainOptions) -> InputItem:
    try:
        given, prompt = plain_prompt(text, options)
    except ValueError as exc:
        return _error(line, str(exc))
    return BatchRequest(line, given or f"line-{line}", options.url, plain_body(prompt, options))


def read_input(path: Path, plain: PlainOptions | None = None) -> Iterator[InputItem]:
    """Every non-blank line of ``path`` as a request or an error, lazily, in file order."""
    for number, text in _lines(path):
        if plain is None:
            yield validate_openai_line(number, text)
        else:
            yield validate_plain_line(number, text, plain)


def duplicate_error(request: BatchRequest) -> InputError:
    """The error line of a request whose id an earlier line of this file already used. It
    carries no custom_id: the id belongs to that earlier line's result."""
    return _error(
        request.line, f"custom_id {request.custom_id!r} repeats an earlier line; ids must be unique"
    )
