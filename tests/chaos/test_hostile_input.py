"""Hostile input, fuzzed with hypothesis: bodies, paths, methods, headers, keys, settings.

The router runs in a background thread (its own event loop) over a recording fake replica, and
hypothesis drives it synchronously through raw sockets, so any byte sequence can be sent. For
every example: a 4xx (never a 5xx, never a hang), an OpenAI-style error body from the router,
no traceback or internal address in the answer, nothing forwarded outside /v1/*, and the
router still answering. Examples are derandomized (same every run) and bounded in number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp.http_exceptions import BadHttpMessage
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.chaos.conftest import FIGURES, LogTally, is_openai_error, router_config, serving
from tests.support.router import Recorder, running_recorder
from vllm_fleet.router.app import make_app
from vllm_fleet.router.cli import register
from vllm_fleet.router.config import OPTIONS, config_from_args
from vllm_fleet.router.errors import ConfigError
from vllm_fleet.router.logs import ClientProtocolErrors

CLIENT_KEY = "sk-client-7f3a9c"
ADMIN_KEY = "sk-admin-41d2e8"
MODEL = "rec-model"
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TRACEBACK = re.compile(rb"Traceback|File \"|\.py\", line")


@dataclass
class Served:
    """A router (and its fake replica) running in a background thread."""

    port: int
    recorder: Recorder
    logs: LogTally
    loop: asyncio.AbstractEventLoop
    tally: dict[str, int] = field(default_factory=dict)

    @property
    def internal(self) -> bytes:
        """The replica's address: must never reach a client."""
        return self.recorder.url.removeprefix("http://").encode()


def _serve_in_thread(**overrides: Any) -> Iterator[Served]:
    ready: dict[str, Any] = {}
    started = threading.Event()
    stop: asyncio.Future[None] | None = None
    logs = LogTally()

    async def main() -> None:
        nonlocal stop
        async with AsyncExitStack() as stack:
            recorder = await stack.enter_async_context(running_recorder(MODEL))
            config = router_config(backends=(recorder.url,), body_timeout_s=2.0, **overrides)
            router = await stack.enter_async_context(serving(make_app(config), config))
            ctx = router.ctx
            for _ in range(1000):  # up to ~20 s
                if ctx.fleet.healthy():
                    break
                await asyncio.sleep(0.02)
            loop = asyncio.get_running_loop()
            stop = loop.create_future()
            ready["served"] = Served(int(router.url.rsplit(":", 1)[1]), recorder, logs, loop)
            started.set()
            await stop

    loggers = [logging.getLogger(n) for n in ("vllm_fleet", "aiohttp")]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.addHandler(logs)
        lg.propagate = False
    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    try:
        assert started.wait(30.0), "router thread did not get ready"
        served: Served = ready["served"]
        yield served
    finally:
        if stop is not None:
            served.loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(30.0)
        for lg, level, propagate in saved:
            lg.removeHandler(logs)
            lg.setLevel(level)
            lg.propagate = propagate
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def open_router() -> Iterator[Served]:
    yield from _serve_in_thread()


@pytest.fixture(scope="module")
def locked_router() -> Iterator[Served]:
    yield from _serve_in_thread(api_keys=(CLIENT_KEY,), admin_api_keys=(ADMIN_KEY,))


# -- raw HTTP ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes


def exchange(port: int, raw: bytes, timeout_s: float = 15.0) -> Answer:
    """Send ``raw`` on a fresh connection and read until the router closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(raw)
        chunks: list[bytes] = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
            if _complete(b"".join(chunks)):
                break
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), f"not an HTTP answer: {data[:200]!r}"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(lines[0].split()[1]), headers, body, data)


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    return match is not None and len(body) >= int(match.group(1))


def request(
    method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: router", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def check_answer(served: Served, answer: Answer, *, allow_ok: bool, head: bool = False) -> None:
    """The properties every hostile request must keep."""
    assert answer.status < 500, answer.raw[:500]
    assert allow_ok or answer.status >= 400, answer.raw[:500]
    assert not TRACEBACK.search(answer.raw), answer.raw[:500]
    assert served.internal not in answer.raw, answer.raw[:500]
    if answer.status >= 400:
        # Every error, including bytes aiohttp's parser rejects before the app runs
        # (vllm_fleet.router.protocol_errors), is an OpenAI-style JSON body.
        assert answer.headers.get("content-type", "").startswith("application/json"), answer.raw[
            :500
        ]
        assert head or is_openai_error(answer.body), answer.raw[:500]  # HEAD: no body
        kind = f"openai_error_{answer.status}"
        served.tally[kind] = served.tally.get(kind, 0) + 1
    for seen in served.recorder.requests:
        assert seen.method == "POST", seen
        path = seen.path_qs.split("?", 1)[0]
        assert path.startswith("/v1/") and "//" not in path, seen
        assert all(part not in ("", ".", "..") for part in path[4:].split("/")), seen
        assert "%" not in path, seen


def still_alive(served: Served) -> None:
    answer = exchange(served.port, request("GET", "/health"))
    assert answer.status == 200


# -- strategies ---------------------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
wrong_typed = st.fixed_dictionaries(
    {},
    optional={
        "model": json_value,
        "max_tokens": json_value,
        "stream": json_value,
        "prompt": json_value,
        "messages": json_value,
    },
)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "typed", "deep", "truncated", "big"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_value)).encode()
    if kind == "typed":
        return json.dumps(draw(wrong_typed)).encode()
    if kind == "deep":
        depth = draw(st.integers(1000, 200_000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return (opener * depth + "1" + closer * depth).encode()
    if kind == "truncated":
        text = json.dumps({"model": MODEL, "prompt": "x" * draw(st.integers(0, 50))})
        return text[: draw(st.integers(0, len(text) - 1))].encode()
    return b'{"model": "' + b"m" * draw(st.integers(1 << 16, 1 << 20)) + b'"}'


segment = st.sampled_from(
    [
        "..", ".", "%2e%2e", "%2E.", "%2f", "%2F..%2F", "admin", "fleet", "replicas", "metrics",
        "completions", "chat", "v1", "", "%00", "~", "a b", "%252e%252e", ";x=1", "\u00e9",
    ]
)  # fmt: skip
path = st.lists(segment, min_size=0, max_size=5).map(lambda parts: "/".join(parts))
target = st.one_of(
    path.map(lambda p: "/v1/" + p),
    path.map(lambda p: "/" + p),
    path.map(lambda p: "//" + p),
    path.map(lambda p: "http://169.254.169.254/v1/" + p),
    path.map(lambda p: "http://router/v1/" + p),
    st.sampled_from(["*", "127.0.0.1:22", "/v1/..%2F..%2Ffleet/replicas", "/v1/%2e%2e/metrics"]),
)
method = st.sampled_from(
    ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "HEAD", "BREW"]
)
header_name = st.from_regex(r"[A-Za-z][A-Za-z0-9\-]{0,15}", fullmatch=True)
header_value = st.one_of(
    st.from_regex(r"[ -~]{0,40}", fullmatch=True),
    st.sampled_from(["x\r\nX-Injected: 1", "a\rb", "a\nb", "close, Authorization", "\x00"]),
)
odd_headers = st.dictionaries(
    st.one_of(
        header_name,
        st.sampled_from(["Connection", "Transfer-Encoding", "X-Request-Id", "Host", "Expect"]),
    ),
    header_value,
    max_size=4,
)


# -- tests --------------------------------------------------------------------------------------


@FUZZ
@given(body=hostile_bodies(), endpoint=st.sampled_from(["completions", "chat/completions"]))
@example(body=b"[" * 100_000 + b"]" * 100_000, endpoint="completions")  # was a 500
def test_hostile_bodies_get_a_4xx_openai_error(
    open_router: Served, body: bytes, endpoint: str
) -> None:
    headers = {"Content-Type": "application/json"}
    answer = exchange(open_router.port, request("POST", f"/v1/{endpoint}", headers, body))
    check_answer(open_router, answer, allow_ok=True)
    if answer.status == 200:  # a body that happened to be valid went to the replica
        assert json.loads(body).get("model") == MODEL
    still_alive(open_router)


@FUZZ
@given(method=method, target=target, headers=odd_headers, body=st.binary(max_size=64))
def test_path_tricks_odd_methods_and_headers_never_leave_v1(
    open_router: Served, method: str, target: str, headers: dict[str, str], body: bytes
) -> None:
    try:
        raw = request(method, target, headers, body)
    except UnicodeEncodeError:
        raw = request(method, target.encode("utf-8").decode("latin-1"), headers, body)
    answer = exchange(open_router.port, raw)
    # A trick may land on a real endpoint (GET /metrics, GET /v1/models via an absolute URI):
    # fine, as long as only GET/HEAD/POST routes answer and nothing leaves /v1/*.
    allow_ok = method in ("GET", "HEAD", "POST")
    check_answer(open_router, answer, allow_ok=allow_ok, head=method == "HEAD")
    if "x-injected" in answer.headers:
        raise AssertionError(f"header injection reflected: {answer.raw[:300]!r}")
    request_id = answer.headers.get("x-request-id")
    if request_id is not None:
        assert re.fullmatch(r"[A-Za-z0-9._:\-]{1,128}", request_id), answer.raw[:300]
    still_alive(open_router)


def test_hostile_input_left_no_router_traceback_in_the_logs(open_router: Served) -> None:
    """Runs after the fuzzers above (same module fixture): the router handled every example
    itself; aiohttp's own parser logs its 400s (with a traceback, at ERROR level)."""
    router_errors = [k for k in open_router.logs.by_kind if k.startswith("ERROR vllm_fleet")]
    assert not router_errors, router_errors
    parser = sum(n for k, n in open_router.logs.by_kind.items() if "aiohttp.server" in k)
    FIGURES["hostile_input"] = {
        "answers": dict(open_router.tally),
        "aiohttp_parser_log_records": parser,
        "forwarded_to_the_replica": len(open_router.recorder.requests),
    }


def test_bytes_that_are_not_http_are_one_warning_line_not_a_traceback() -> None:
    """vllm_fleet.router.logs installs this filter on aiohttp.server (configure_logging)."""
    try:
        raise BadHttpMessage("Invalid header token:\n\n  b'X-A b'\n       ^")
    except BadHttpMessage:
        record = logging.getLogger("aiohttp.server").makeRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
            ("127.0.0.1",), sys.exc_info(),
        )  # fmt: skip
    assert ClientProtocolErrors().filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == "Error handling request from 127.0.0.1: Invalid header token:"
    other = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "boom", (), None)
    assert ClientProtocolErrors().filter(other) and other.levelno == logging.ERROR


near_misses = st.one_of(
    st.text(max_size=40),
    st.text(max_size=40).map(lambda t: "Bearer " + t),
    st.sampled_from(
        [
            f"Bearer {CLIENT_KEY[:-1]}",
            f"Bearer {CLIENT_KEY}x",
            f"Bearer {CLIENT_KEY.upper()}",
            f"Basic {CLIENT_KEY}",
            f"Bearer{CLIENT_KEY}",
            f"Token {ADMIN_KEY}",
            f"Bearer {ADMIN_KEY[1:]}",
            "Bearer ",
        ]
    ),
)
PROTECTED = [("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/fleet/replicas")]


@FUZZ
@given(authorization=st.one_of(st.none(), near_misses), index=st.integers(0, 3))
@example(authorization="Bearer \x80", index=0)  # was a 500: the key could not be encoded
def test_missing_or_wrong_keys_are_401_everywhere_protected(
    locked_router: Served, authorization: str | None, index: int
) -> None:
    verb, where = [*PROTECTED, ("GET", "/metrics")][index]
    headers = {} if authorization is None else {"Authorization": authorization}
    if verb == "POST":
        headers["Content-Type"] = "application/json"
    body = json.dumps({"model": MODEL, "prompt": "hi"}).encode() if verb == "POST" else b""
    try:
        raw = request(verb, where, headers, body)
    except UnicodeEncodeError:
        return  # not sendable as an HTTP/1.1 header
    answer = exchange(locked_router.port, raw)
    if answer.status == 400:
        # Not a valid header at all: refused by the HTTP parser (vllm_fleet.router.protocol_errors).
        assert is_openai_error(answer.body), answer.raw[:300]
        assert json.loads(answer.body)["error"]["code"] == "bad_request"
        return
    assert answer.status == 401, answer.raw[:300]
    assert is_openai_error(answer.body)
    assert answer.headers.get("www-authenticate") == "Bearer"
    assert CLIENT_KEY.encode() not in answer.raw and ADMIN_KEY.encode() not in answer.raw


def test_client_and_admin_keys_open_only_their_own_doors(locked_router: Served) -> None:
    def status(verb: str, where: str, key: str) -> int:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        body = json.dumps({"model": MODEL, "prompt": "hi"}).encode() if verb == "POST" else b""
        return exchange(locked_router.port, request(verb, where, headers, body)).status

    assert status("POST", "/v1/completions", CLIENT_KEY) == 200
    assert status("GET", "/v1/models", CLIENT_KEY) == 200
    assert status("GET", "/fleet/replicas", CLIENT_KEY) == 401
    assert status("GET", "/metrics", CLIENT_KEY) == 401
    assert status("GET", "/fleet/replicas", ADMIN_KEY) == 200
    assert status("GET", "/metrics", ADMIN_KEY) == 200
    assert status("POST", "/v1/completions", ADMIN_KEY) == 401
    for probe in ("/health", "/ready"):
        assert exchange(locked_router.port, request("GET", probe)).status == 200
    logged = locked_router.logs.joined()
    assert CLIENT_KEY not in logged and ADMIN_KEY not in logged
    assert CLIENT_KEY[:8] not in logged.replace("sk-", "")  # not even a prefix of the secret part
    assert any("request" in k for k in locked_router.logs.by_kind)  # the access log was on


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_every_bad_setting_is_one_line_naming_its_flag_or_variable(data: st.DataObject) -> None:
    opt = data.draw(st.sampled_from(OPTIONS))
    value = data.draw(
        st.one_of(
            st.text(max_size=20),
            st.sampled_from(["", " ", "-1", "0", "nan", "inf", "1e999", "abc", ",", "a,,b"]),
            st.integers(-(10**6), 10**6).map(str),
        )
    )
    via_flag = data.draw(st.booleans())
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register(sub)
    argv = ["router", "--backend", "http://127.0.0.1:8001"]
    environ: dict[str, str] = {}
    if via_flag:
        argv += [f"{opt.flag}={value}"]
    else:
        environ[opt.env] = value
    try:
        args = parser.parse_args(argv)
        config_from_args(args, environ)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        assert opt.flag in message or opt.env in message, (opt.flag, message)
    except SystemExit:  # argparse's own one-line usage error (e.g. a value like "-1" as a flag)
        pass
