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
import bisect
import hashlib
import itertools
import json
import math
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
    #: The chat to send, (role, content) in order; empty = one user message with `prompt`.
    messages: tuple[tuple[str, str], ...] = ()
    #: What a client-side affinity pick keys on (the prefix group, the conversation); "" = none.
    group: str = ""
    #: Index of the turn this request continues: it is sent when that one has answered (and
    #: not before `at`), as a user waits for the reply before typing the next message.
    follows: int | None = None


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


def _text(rng: random.Random, head: str, tokens: int) -> str:
    """`head` and seeded words up to about `tokens` tokens (4 bytes a token, as the simulator
    and most BPE tokenizers on English count)."""
    words = [head]
    size = len(head)
    while size < 4 * tokens:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


@dataclass(frozen=True)
class PrefixMix:
    """Shared-prefix traffic: each request is one of `groups` system prompts (~`prefix_tokens`)
    followed by a fresh question, as an application with many assistants or RAG over the same
    documents sends."""

    #: mean arrivals per second (Poisson).
    rate: float
    duration: float
    seed: int = 1
    groups: int = 64
    prefix_tokens: int = 1500
    question_tokens: tuple[int, int] = (80, 120)
    output_tokens: tuple[int, int] = (16, 64)
    #: Zipf exponent of the groups' popularity (group g drawn with weight 1/(g+1)^zipf);
    #: 0 = every group equally likely.
    zipf: float = 0.0
    stream_fraction: float = 1.0

    def group_weights(self) -> list[float]:
        return [1.0 / (g + 1) ** self.zipf for g in range(self.groups)]


def make_prefix_schedule(mix: PrefixMix) -> list[RequestSpec]:
    """The seeded shared-prefix sequence: Poisson arrivals, group by `mix.group_weights()`."""
    rng = random.Random(mix.seed)
    # The group number leads its prompt, so two groups differ from their first block on.
    systems = [
        _text(rng, f"You are assistant {g} of seed {mix.seed}.", mix.prefix_tokens)
        for g in range(mix.groups)
    ]
    weights = mix.group_weights()
    specs: list[RequestSpec] = []
    at = rng.expovariate(mix.rate)
    while at < mix.duration:
        index = len(specs)
        group = rng.choices(range(mix.groups), weights)[0]
        question = _text(rng, f"Question {index}:", rng.randint(*mix.question_tokens))
        messages = (("system", systems[group]), ("user", question))
        specs.append(
            RequestSpec(
                index,
                at,
                question,
                rng.randint(*mix.output_tokens),
                rng.random() < mix.stream_fraction,
                messages=messages,
                group=f"group-{group}",
            )
        )
        at += rng.expovariate(mix.rate)
    return specs


@dataclass(frozen=True)
class ConversationMix:
    """Multi-turn chats that resend their history: conversations start as a Poisson process,
    each opens with one of a few system prompts and a long first message, and every later turn
    sends the whole conversation so far (the replies as the client received them) plus a new
    message, `think_s` after the previous turn was sent and never before it was answered."""

    #: new conversations per second.
    rate: float
    #: seconds during which turns are sent (later turns are left out).
    duration: float
    seed: int = 1
    system_prompts: int = 8
    system_tokens: int = 400
    first_tokens: tuple[int, int] = (150, 400)
    turn_tokens: tuple[int, int] = (30, 120)
    output_tokens: tuple[int, int] = (32, 96)
    turns: tuple[int, int] = (3, 8)
    think_s: tuple[float, float] = (3.0, 8.0)
    stream_fraction: float = 1.0


#: The assistant's answer to a chat of `max_tokens` tokens, as the client will have it.
Reply = Callable[[tuple[tuple[str, str], ...], int], str]


def make_conversation_schedule(
    mix: ConversationMix, reply: Reply | None = None
) -> list[RequestSpec]:
    """The seeded multi-turn sequence, every turn a request, in order of sending time.

    `reply` gives the answer each turn gets, which the next turn sends back; the simulator's
    answers are fixed by the chat (bench.prefix_oracle.reply_text), so the history is exactly
    what a client would have received from any replica. Without it, seeded words stand in.
    """
    rng = random.Random(mix.seed)
    systems = [
        _text(rng, f"You are chat assistant {s} of seed {mix.seed}.", mix.system_tokens)
        for s in range(mix.system_prompts)
    ]
    # (at, conversation, turn, chat, max_tokens, stream) per turn, indexed after sorting.
    turns: list[tuple[float, int, int, tuple[tuple[str, str], ...], int, bool]] = []
    start = rng.expovariate(mix.rate)
    conversation = 0
    while start < mix.duration:
        chat: tuple[tuple[str, str], ...] = (("system", rng.choice(systems)),)
        at = start
        for turn in range(rng.randint(*mix.turns)):
            span = mix.first_tokens if turn == 0 else mix.turn_tokens
            chat += (("user", _text(rng, f"Chat {conversation} turn {turn}:", rng.randint(*span))),)
            max_tokens = rng.randint(*mix.output_tokens)
            turns.append(
                (at, conversation, turn, chat, max_tokens, rng.random() < mix.stream_fraction)
            )
            # What the client will have received: max_tokens tokens of answer text.
            answer = reply(chat, max_tokens) if reply else _text(rng, f"Answer {turn}:", max_tokens)
            chat += (("assistant", answer),)
            at += rng.uniform(*mix.think_s)
            if at >= mix.duration:
                break
        conversation += 1
        start += rng.expovariate(mix.rate)
    turns.sort(key=lambda t: t[0])
    index_of: dict[tuple[int, int], int] = {}
    specs: list[RequestSpec] = []
    for index, (at, conv, turn, chat, max_tokens, stream) in enumerate(turns):
        index_of[(conv, turn)] = index
        specs.append(
            RequestSpec(
                index,
                at,
                chat[-1][1],
                max_tokens,
                stream,
                messages=chat,
                group=f"chat-{conv}",
                follows=index_of.get((conv, turn - 1)),
            )
        )
    return specs


class Target(Protocol):
    """Where the next request goes; `release` is called when its response is fully read.

    `key` is the request's affinity key (RequestSpec.group); only affinity picks read it.
    """

    def acquire(self, key: str = "") -> str: ...

    def release(self, url: str) -> None: ...


class FixedTarget:
    """Everything to one URL (a router, or one replica for the direct baseline)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def acquire(self, key: str = "") -> str:
        return self.url

    def release(self, url: str) -> None:
        pass


class RoundRobinTarget:
    """Client-side round robin straight to the replicas: round robin without a router hop."""

    def __init__(self, urls: Sequence[str]) -> None:
        self._cycle = itertools.cycle([u.rstrip("/") for u in urls])

    def acquire(self, key: str = "") -> str:
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

    def acquire(self, key: str = "") -> str:
        urls = list(self.in_flight)
        self._turn = (self._turn + 1) % len(urls)
        rotated = urls[self._turn :] + urls[: self._turn]
        url = min(rotated, key=self.in_flight.__getitem__)
        self.in_flight[url] += 1
        return url

    def release(self, url: str) -> None:
        self.in_flight[url] -= 1


def _ring_hash(text: str) -> int:
    """A stable 64-bit hash (Python's str hash changes per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class BoundedLoadHash:
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018) on the
    request's affinity key, done by the client with exact in-flight counts.

    What a prefix-aware client does without any cache knowledge: a key keeps going to the
    replica it hashes to, so that replica keeps the key's prefix cached, unless that replica
    already runs more than `balance` times the mean load, in which case the next replica on
    the ring takes it. `balance` 1.25 is the paper's and HAProxy's `hash-balance-factor 125`.
    Requests without a key go to the least-busy replica.
    """

    def __init__(self, urls: Sequence[str], balance: float = 1.25, points: int = 64) -> None:
        self.in_flight = {u.rstrip("/"): 0 for u in urls}
        self.balance = balance
        ring = [(_ring_hash(f"{url}#{i}"), url) for url in self.in_flight for i in range(points)]
        ring.sort()
        self._ring_keys = [h for h, _ in ring]
        self._ring_urls = [u for _, u in ring]

    def acquire(self, key: str = "") -> str:
        if not key:
            url = min(self.in_flight, key=self.in_flight.__getitem__)
        else:
            load = sum(self.in_flight.values()) + 1
            cap = math.ceil(self.balance * load / len(self.in_flight))
            start = bisect.bisect(self._ring_keys, _ring_hash(key))
            size = len(self._ring_urls)
            url = self._ring_urls[start % size]
            for step in range(size):  # bounded: some replica is always under the cap
                candidate = self._ring_urls[(start + step) % size]
                if self.in_flight[candidate] + 1 <= cap:
                    url = candidate
                    break
        self.in_flight[url] += 1
        return url

    def release(self, url: str) -> None:
        self.in_flight[url] -= 1


def request_body(spec: RequestSpec, model: str) -> dict[str, object]:
    chat = spec.messages or (("user", spec.prompt),)
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": role, "content": content} for role, content in chat],
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
    url = target.acquire(spec.group)
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

    A request that `follows` another is sent once that one has answered (a chat's next turn),
    so it may leave after its `at`. Requests still running `drain_timeout` seconds after the
    last send are cancelled and recorded as errors, so a stuck router cannot hang the benchmark.
    `t0` (a perf_counter value) lets a scenario time its own actions (a crash, a slowdown) on
    the same clock.
    """
    async with make_session() as session:
        t0 = time.perf_counter() if t0 is None else t0
        tasks: list[asyncio.Task[RequestRecord]] = []
        by_index: dict[int, asyncio.Task[RequestRecord]] = {}

        async def send_after(
            spec: RequestSpec, previous: asyncio.Task[RequestRecord]
        ) -> RequestRecord:
            try:
                await asyncio.wait([previous])
            except asyncio.CancelledError:
                now = time.perf_counter() - t0
                cut = "cut at the drain deadline (the turn before it never answered)"
                return RequestRecord(
                    spec.index, spec.stream, spec.max_tokens, now, None, now, 0, 0, cut, ""
                )
            return await send_one(session, target, spec, model, t0, request_timeout)

        for spec in schedule:
            delay = spec.at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            previous = by_index.get(spec.follows) if spec.follows is not None else None
            if previous is None or previous.done():
                send = send_one(session, target, spec, model, t0, request_timeout)
            else:
                send = send_after(spec, previous)
            task = asyncio.create_task(send)
            tasks.append(task)
            by_index[spec.index] = task
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
