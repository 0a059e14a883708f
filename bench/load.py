"""Open-loop, seeded load: the same request sequence for every router, timed per request.

Open loop (arrivals on a fixed schedule, never waiting for earlier answers) because that is how
independent users behave: a closed loop slows down with the system it measures and hides queues.
The schedule and every request body come from one seed, so each router sees byte-identical
traffic at the same offsets.

Where a request goes is a `Target`: one URL (a router, or one replica), or a client-side
balancer over the replicas themselves (the join-shortest-queue ideal, or plain round robin),
which is how "no router at all" is measured.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp

#: Response headers that name the replica a router used (ours, and the nginx/HAProxy configs
#: the harness writes). Rust routers send none; their shares come from the replicas' counters.
REPLICA_HEADERS = ("x-vllm-fleet-replica", "x-bench-upstream")


@dataclass(frozen=True)
class RequestMix:
    """The shape of the traffic; every field is a knob a scenario turns."""

    #: mean arrivals per second (Poisson).
    rate: float
    #: seconds during which requests are sent.
    duration: float
    seed: int = 1
    short_tokens: tuple[int, int] = (16, 64)
    long_tokens: tuple[int, int] = (256, 512)
    long_fraction: float = 0.2
    prompt_words: tuple[int, int] = (32, 1024)
    stream_fraction: float = 0.9
    #: fraction of requests sent without max_tokens (the server picks the length).
    omit_max_tokens_fraction: float = 0.0

    def mean_tokens(self, default_max_tokens: int) -> float:
        """Expected output tokens per request; `default_max_tokens` is what the server uses
        when the request gives none."""
        short = sum(self.short_tokens) / 2
        long = sum(self.long_tokens) / 2
        asked = (1 - self.long_fraction) * short + self.long_fraction * long
        omitted = self.omit_max_tokens_fraction
        return (1 - omitted) * asked + omitted * default_max_tokens


@dataclass(frozen=True)
class RequestSpec:
    """One request of the schedule: when to send it (seconds after the start) and what."""

    index: int
    at: float
    prompt: str
    max_tokens: int | None
    stream: bool


@dataclass(frozen=True)
class RequestRecord:
    """What one request did; times are seconds since the start of the run."""

    index: int
    stream: bool
    max_tokens: int | None
    start: float
    #: seconds from start to the first content token (streamed requests only).
    ttft: float | None
    end: float
    tokens: int
    #: HTTP status; 0 when no response arrived (connection error, timeout, cut at the drain).
    status: int
    error: str
    #: replica base URL or upstream name when known, else "".
    replica: str

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error

    @property
    def latency(self) -> float:
        return self.end - self.start


_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
    "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra",
    "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "fleet", "model",
    "replica", "router", "token", "batch", "cache", "queue", "prompt", "answer", "server",
    "request", "stream", "latency",
)  # fmt: skip


def make_schedule(mix: RequestMix) -> list[RequestSpec]:
    """The seeded request sequence: Poisson arrivals over `mix.duration` seconds."""
    rng = random.Random(mix.seed)
    specs: list[RequestSpec] = []
    at = rng.expovariate(mix.rate)
    while at < mix.duration:
        index = len(specs)
        words = rng.randint(*mix.prompt_words)
        # A unique head keeps prefix-matching routers from seeing fake shared prefixes.
        prompt = f"request {index} seed {mix.seed}: " + " ".join(rng.choices(_WORDS, k=words))
        span = mix.long_tokens if rng.random() < mix.long_fraction else mix.short_tokens
        max_tokens: int | None = rng.randint(*span)
        if rng.random() < mix.omit_max_tokens_fraction:
            max_tokens = None
        stream = rng.random() < mix.stream_fraction
        specs.append(RequestSpec(index, at, prompt, max_tokens, stream))
        at += rng.expovariate(mix.rate)
    return specs


class Target(Protocol):
    """Where the next request goes; `release` is called when its response is fully read."""

    def acquire(self) -> str: ...

    def release(self, url: str) -> None: ...


class FixedTarget:
    """Everything to one URL (a router, or one replica for the direct baseline)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def acquire(self) -> str:
        return self.url

    def release(self, url: str) -> None:
        pass


class RoundRobinTarget:
    """Client-side round robin straight to the replicas: round robin without a router hop."""

    def __init__(self, urls: Sequence[str]) -> None:
        self._cycle = itertools.cycle([u.rstrip("/") for u in urls])

    def acquire(self) -> str:
        return next(self._cycle)

    def release(self, url: str) -> None:
        pass


class JoinShortestQueue:
    """The least-busy ideal: the client knows every replica's exact in-flight count.

    No router can beat this at balancing by request count (it has perfect, instant
    information and adds no hop). Ties rotate so no replica is favoured by its position.
    """

    def __init__(self, urls: Sequence[str]) -> None:
        self.in_flight = {u.rstrip("/"): 0 for u in urls}
        self._turn = 0

    def acquire(self) -> str:
        urls = list(self.in_flight)
        self._turn = (self._turn + 1) % len(urls)
        rotated = urls[self._turn :] + urls[: self._turn]
        url = min(rotated, key=self.in_flight.__getitem__)
        self.in_flight[url] += 1
        return url

    def release(self, url: str) -> None:
        self.in_flight[url] -= 1


def request_body(spec: RequestSpec, model: str) -> dict[str, object]:
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": spec.prompt}],
        "stream": spec.stream,
    }
    if spec.max_tokens is not None:
        body["max_tokens"] = spec.max_tokens
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _replica_of(headers: Iterable[tuple[str, str]], url: str, fixed: bool) -> str:
    found = {k.lower(): v for k, v in headers}
    for name in REPLICA_HEADERS:
        if name in found:
            return found[name]
    return "" if fixed else url


async def _read_stream(
    response: aiohttp.ClientResponse, t0: float
) -> tuple[float | None, int, str]:
    """Consume an SSE body: (first token time since t0, tokens, error).

    Tokens prefer the usage chunk's count, falling back to content chunks.
    """
    ttft: float | None = None
    content_chunks = 0
    usage_tokens: int | None = None
    done = False
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            # Read on to the end of the body, as the openai client does, so the connection
            # goes back to the pool instead of being closed (and re-opened per request).
            done = True
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            return ttft, content_chunks, f"error event: {str(chunk['error'])[:120]}"
        usage = chunk.get("usage")
        if usage:
            usage_tokens = int(usage.get("completion_tokens", 0))
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                content_chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    tokens = usage_tokens if usage_tokens is not None else content_chunks
    return ttft, tokens, "" if done else "stream ended without [DONE]"


async def send_one(
    session: aiohttp.ClientSession,
    target: Target,
    spec: RequestSpec,
    model: str,
    t0: float,
    timeout: float,
) -> RequestRecord:
    """Send one request and time it; never raises (failures become the record's error)."""
    url = target.acquire()
    start = time.perf_counter() - t0
    ttft: float | None = None
    tokens = 0
    status = 0
    error = ""
    replica = ""
    fixed = isinstance(target, FixedTarget)
    try:
        async with session.post(
            f"{url}/v1/chat/completions",
            json=request_body(spec, model),
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            status = response.status
            replica = _replica_of(response.headers.items(), url, fixed)
            if status != 200:
                error = f"HTTP {status}: {(await response.text())[:120]}"
            elif spec.stream:
                first, tokens, error = await _read_stream(response, t0)
                ttft = None if first is None else first - start
            else:
                body = await response.json(content_type=None)
                tokens = int((body.get("usage") or {}).get("completion_tokens", 0))
    except asyncio.CancelledError:
        error = "cut at the drain deadline"
        status = 0
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        error = f"{type(exc).__name__}: {str(exc)[:120]}"
    finally:
        target.release(url)
    end = time.perf_counter() - t0
    return RequestRecord(
        spec.index, spec.stream, spec.max_tokens, start, ttft, end, tokens, status, error, replica
    )


def make_session() -> aiohttp.ClientSession:
    """One session per run: unlimited pool (an open loop must never queue in the client)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))


async def run_open_loop(
    target: Target,
    schedule: Sequence[RequestSpec],
    model: str,
    *,
    request_timeout: float = 120.0,
    drain_timeout: float = 60.0,
    t0: float | None = None,
) -> list[RequestRecord]:
    """Send every request of `schedule` at its time; wait for the answers (bounded).

    Requests still running `drain_timeout` seconds after the last send are cancelled and
    recorded as errors, so a stuck router cannot hang the benchmark. `t0` (a perf_counter
    value) lets a scenario time its own actions (a crash, a slowdown) on the same clock.
    """
    async with make_session() as session:
        t0 = time.perf_counter() if t0 is None else t0
        tasks: list[asyncio.Task[RequestRecord]] = []
        for spec in schedule:
            delay = spec.at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(
                asyncio.create_task(send_one(session, target, spec, model, t0, request_timeout))
            )
        if tasks:
            await asyncio.wait(tasks, timeout=drain_timeout)
        for task in tasks:
            task.cancel()
        return list(await asyncio.gather(*tasks))


async def run_closed_loop(
    target: Target,
    make_spec: Callable[[int], RequestSpec],
    model: str,
    *,
    concurrency: int,
    duration: float,
    request_timeout: float = 30.0,
) -> list[RequestRecord]:
    """`concurrency` users each sending the next request as soon as the last one answers.

    Used for router overhead, where the question is "how many requests per second, at what
    added latency" at a fixed number of requests in flight.
    """
    counter = itertools.count()
    async with make_session() as session:
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def user() -> list[RequestRecord]:
            done: list[RequestRecord] = []
            while time.perf_counter() < deadline:
                spec = make_spec(next(counter))
                done.append(await send_one(session, target, spec, model, t0, request_timeout))
            return done

        per_user = await asyncio.gather(*(user() for _ in range(concurrency)))
    return [record for records in per_user for record in records]
