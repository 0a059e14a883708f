"""Soak: 10,000 mixed requests through the router while replicas crash, hang, slow down and fail.

Every request is accounted for (complete answer, or a clear OpenAI-style error), none is stuck
past its deadline, none is answered by two replicas, and the router's connections, tasks and
memory come back to their starting level afterwards.

The fault schedule is seeded and driven by progress (faults start and end after so many
finished requests, not after so many seconds), so it is the same on a fast idle machine and on
a loaded CI runner; only the interleaving of individual requests differs.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp

from tests.chaos.conftest import (
    FIGURES,
    Receptions,
    Resources,
    is_openai_error,
    object_types,
    recording_sim,
    tally_logs,
)
from tests.support.router import DEFAULT_TIMINGS, RouterHandle, eventually, running_router
from tests.support.sim import SIM_MODEL, SimHandle
from vllm_fleet.router.progress import MIN_FIRST_BYTE_S
from vllm_fleet.router.state import Fleet

SEED = 20261126
REQUESTS = 10_000
WARMUP = 300
CONCURRENCY = 48
REPLICAS = 4
#: Whole-request deadline seen by the client: far above any legitimate wait (a hung replica
#: costs a few seconds before its requests are re-sent: vllm_fleet.router.progress), so hitting it
#: means a request got stuck.
CLIENT_DEADLINE_S = 60.0
SHORT_TOKENS = (1, 2, 3, 5, 8)
LONG_TOKENS = (24, 48)
FAULT_KINDS = ("stop", "hang", "slow", "fail", "unhealthy")
#: A hang lasts at least this long (beyond its share of the schedule), so the requests it
#: holds outlive the progress monitor's detection and are re-sent elsewhere.
MIN_HANG_S = 5.0
#: The router's defaults: no shortened timeout (--first-byte-timeout stays 600 s, health checks
#: every 1 s with a 2 s timeout), so what the soak shows is what users get.
ROUTER_SETTINGS: dict[str, Any] = DEFAULT_TIMINGS
SIM_SETTINGS: dict[str, Any] = {"step_ms": 1.0, "batch_slowdown": 0.0, "max_num_seqs": 64}


@dataclass(frozen=True)
class Spec:
    index: int
    chat: bool
    stream: bool
    max_tokens: int

    @property
    def request_id(self) -> str:
        return f"soak-{self.index}"

    def body(self) -> bytes:
        payload: dict[str, object] = {
            "model": SIM_MODEL,
            "max_tokens": self.max_tokens,
            "stream": self.stream,
        }
        if self.chat:
            payload["messages"] = [{"role": "user", "content": f"question {self.index}"}]
        else:
            payload["prompt"] = f"prompt {self.index}"
        return json.dumps(payload).encode()

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


def request_mix(rng: random.Random, count: int, start: int = 0) -> list[Spec]:
    return [
        Spec(
            index=start + i,
            chat=rng.random() < 0.5,
            stream=rng.random() < 0.5,
            max_tokens=rng.choice(LONG_TOKENS if rng.random() < 0.2 else SHORT_TOKENS),
        )
        for i in range(count)
    ]


@dataclass(frozen=True)
class Fault:
    kind: str
    replica: int
    #: The fault starts once this many soak requests finished, and ends ``length`` later.
    at: int
    length: int


def fault_schedule(rng: random.Random, total: int) -> list[Fault]:
    """Back-to-back faults on random replicas, each kind at least twice, none in the last 5%."""
    faults: list[Fault] = []
    kinds = list(FAULT_KINDS) * 2
    at = 200
    while at < total * 0.95:
        kind = kinds.pop(0) if kinds else rng.choice(FAULT_KINDS)
        length = rng.randint(200, 500)
        faults.append(Fault(kind, rng.randrange(REPLICAS), at, length))
        at += length + rng.randint(50, 150)
    return faults


class Outcome(NamedTuple):
    """One request as the client saw it: ``kind`` is "ok" or an error kind. Stored as a plain
    tuple (Load.outcomes), which the garbage collector stops tracking, so 10,000 of them do
    not blur the object count of the leak check."""

    kind: str
    elapsed: float = 0.0
    detail: str = ""


def _sse_events(body: bytes) -> list[bytes]:
    return [e[6:] for e in body.split(b"\n\n") if e.startswith(b"data: ")]


def _token_count(spec: Spec, chunk: dict[str, object]) -> int:
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices:
        return 0
    choice = choices[0]
    text = choice["delta"].get("content") if spec.chat else choice.get("text")
    return 1 if text else 0


def judge(spec: Spec, status: int, content_type: str, body: bytes) -> Outcome:
    """Complete and correct, or a clear error; anything else is a "broken" outcome."""
    if status != 200:
        if not is_openai_error(body):
            return Outcome("broken", 0.0, f"HTTP {status} without an OpenAI error: {body[:200]!r}")
        code = json.loads(body)["error"].get("code")
        return Outcome(f"http_{status}_{code}", 0.0)
    if not spec.stream:
        answer = json.loads(body)
        tokens = answer["usage"]["completion_tokens"]
        if tokens != spec.max_tokens or answer["choices"][0]["finish_reason"] != "length":
            return Outcome("broken", 0.0, f"{tokens} tokens for max_tokens={spec.max_tokens}")
        return Outcome("ok", 0.0)
    if not content_type.startswith("text/event-stream"):
        return Outcome("broken", 0.0, f"stream answered as {content_type}")
    events = _sse_events(body)
    tokens = 0
    for event in events:
        if event == b"[DONE]":
            break
        chunk = json.loads(event)
        if "error" in chunk:
            if not is_openai_error(event):
                return Outcome("broken", 0.0, f"unclear stream error {event[:200]!r}")
            return Outcome("stream_cut", 0.0)
        tokens += _token_count(spec, chunk)
    if not events or events[-1] != b"[DONE]":
        return Outcome("broken", 0.0, f"stream without [DONE] after {tokens} tokens")
    if tokens != spec.max_tokens:
        return Outcome("broken", 0.0, f"stream of {tokens} tokens for max_tokens={spec.max_tokens}")
    return Outcome("ok", 0.0)


async def send(session: aiohttp.ClientSession, url: str, spec: Spec) -> Outcome:
    loop = asyncio.get_running_loop()
    started = loop.time()
    headers = {"Content-Type": "application/json", "X-Request-Id": spec.request_id}
    try:
        async with session.post(url + spec.path, data=spec.body(), headers=headers) as resp:
            body = await resp.read()
            outcome = judge(spec, resp.status, resp.headers.get("Content-Type", ""), body)
    except asyncio.TimeoutError:
        outcome = Outcome("stuck", 0.0, f"no complete answer within {CLIENT_DEADLINE_S}s")
    except aiohttp.ClientError as exc:
        outcome = Outcome("connection_error", 0.0, f"{type(exc).__name__}: {exc}")
    return outcome._replace(elapsed=loop.time() - started)


@dataclass
class Load:
    """Runs specs with a fixed number of workers; ``done`` drives the fault schedule."""

    url: str
    specs: list[Spec]
    outcomes: dict[int, tuple[str, float, str]] = field(default_factory=dict)
    done: int = 0

    async def run(self) -> None:
        queue = iter(self.specs)
        timeout = aiohttp.ClientTimeout(total=CLIENT_DEADLINE_S)
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

            async def worker() -> None:
                for spec in queue:
                    outcome = await send(session, self.url, spec)
                    self.outcomes[spec.index] = (outcome.kind, outcome.elapsed, outcome.detail)
                    self.done += 1

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


class Fleet4:
    """The simulators, each restartable on its own port; keeps only live incarnations."""

    def __init__(self, receptions: Receptions) -> None:
        self.receptions = receptions
        self.handles: list[SimHandle] = []
        self._contexts: list[AbstractAsyncContextManager[SimHandle]] = []
        self.revivals = 0

    async def start(self) -> None:
        for _ in range(REPLICAS):
            context = recording_sim(self.receptions, **SIM_SETTINGS)
            self.handles.append(await context.__aenter__())
            self._contexts.append(context)

    async def revive(self, i: int) -> None:
        """Stop (crash) replica ``i`` and bring a new one up on the same port."""
        await self._contexts[i].__aexit__(None, None, None)
        context = recording_sim(self.receptions, port=self.handles[i].port, **SIM_SETTINGS)
        self.handles[i] = await context.__aenter__()
        self._contexts[i] = context
        self.revivals += 1

    async def close(self) -> None:
        for context in self._contexts:
            await context.__aexit__(None, None, None)

    def totals(self) -> collections.Counter[str]:
        """received/finished/aborted/failed of the live incarnations."""
        total: collections.Counter[str] = collections.Counter()
        for handle in self.handles:
            stats = handle.stats()
            for name in ("received", "finished", "aborted", "failed"):
                total[name] += getattr(stats, name)
        return total


async def inject(fleet: Fleet4, load: Load, faults: list[Fault], applied: list[str]) -> None:
    async def reached(count: int) -> None:
        await eventually(lambda: load.done >= count, 240.0, f"{count} finished requests")

    for fault in faults:
        await reached(fault.at)
        sim = fleet.handles[fault.replica]
        if fault.kind == "stop":
            fleet.receptions.crash(sim.url)
            await sim.stop()  # a crash: listening socket and open connections cut at once
        elif fault.kind == "hang":
            await sim.control(hang=True)
        elif fault.kind == "slow":
            await sim.control(speed=0.1)
        elif fault.kind == "fail":
            await sim.control(fail_rate=1.0)
        else:
            await sim.control(healthy=False)
        applied.append(f"{fault.kind}@{fault.replica} from {load.done}")
        began = asyncio.get_running_loop().time()
        await reached(fault.at + fault.length)
        if fault.kind == "hang":  # the fault's own duration, not a wait for readiness
            await asyncio.sleep(max(0.0, began + MIN_HANG_S - asyncio.get_running_loop().time()))
        if fault.kind == "stop":
            await fleet.revive(fault.replica)
        else:
            await sim.control(hang=False, speed=1.0, fail_rate=0.0, healthy=True)


def pooled(router: RouterHandle) -> tuple[int, int]:
    """(idle pooled, acquired) upstream connections: the router's session (health checks,
    scrapes) and its proxied requests' client."""
    connector = router.ctx.session.connector
    assert isinstance(connector, aiohttp.TCPConnector)
    idle, busy = router.ctx.client.counts()
    return sum(len(c) for c in connector._conns.values()) + idle, len(connector._acquired) + busy


def diagnose(router: RouterHandle, fleet: Fleet4) -> dict[str, object]:
    """Where open connections and tasks are, for the message of a failed leak check."""
    tasks = collections.Counter(
        getattr(t.get_coro(), "__qualname__", "?") for t in asyncio.all_tasks()
    )
    return {
        "sim_server_connections": [
            len(h._runner.server.connections) if h._runner.server else 0 for h in fleet.handles
        ],
        "sim_held": [h.state.runner.held for h in fleet.handles],
        "router_upstream_pooled_acquired": pooled(router),
        "tasks": tasks.most_common(8),
    }


async def quiesce(router: RouterHandle, baseline: Resources | None) -> Resources:
    """Wait until nothing is in flight, then measure once the upstream pool stops shrinking
    and no upstream connection is out of the pool.

    Idle upstream connections expire after 4 s (UPSTREAM_KEEPALIVE_S) unless reused, and
    aiohttp reuses its pool first-in first-out, so the health checks and scrapes (every
    0.1-0.2 s here) keep up to ~15 connections per replica alive: the leak check counts
    pooled connections separately (each is two fds here: the router's and the replica's).
    """

    def idle() -> bool:
        fleet: Fleet = router.fleet
        return (
            len(fleet.healthy()) == REPLICAS
            and all(r.in_flight == 0 for r in fleet.replicas.values())
            and not router.runner.server.connections  # type: ignore[union-attr]
        )

    await eventually(idle, 90.0, "all replicas back and no request in flight")
    if baseline is None:
        return Resources.now()
    deadline = asyncio.get_running_loop().time() + 10.0
    last = pooled(router)[0]
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(1.0)
        now = pooled(router)[0]
        if now >= last:
            break
        last = now
    # Health checks and scrapes hold an upstream connection for a few milliseconds each; the
    # leak check wants a moment when none is running, which a leaked connection never gives.
    deadline = asyncio.get_running_loop().time() + 10.0
    while pooled(router)[1] and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.005)
    return Resources.now()


async def test_soak_every_request_accounted_for_and_nothing_leaks() -> None:
    rng = random.Random(SEED)
    warmup = request_mix(rng, WARMUP, start=-WARMUP)
    specs = request_mix(rng, REQUESTS)
    faults = fault_schedule(rng, REQUESTS)
    receptions = Receptions()
    fleet = Fleet4(receptions)
    started = time.monotonic()
    with tally_logs("vllm_fleet", "aiohttp", level=logging.INFO) as logs:
        await fleet.start()
        try:
            async with running_router([h.url for h in fleet.handles], **ROUTER_SETTINGS) as router:
                await Load(router.url, warmup).run()
                before = await quiesce(router, None)
                pool_before = pooled(router)[0]
                types_before = object_types()

                load = Load(router.url, specs)
                applied: list[str] = []
                await asyncio.gather(load.run(), inject(fleet, load, faults, applied))

                after = await quiesce(router, before)
                pool_after, acquired = pooled(router)
                where = diagnose(router, fleet)
                types_after = object_types()
                attempts = router.fleet  # for the figures below
                retries = {
                    s.labels["reason"]: s.value
                    for m in router.ctx.telemetry.retries.collect()
                    for s in m.samples
                    if s.name.endswith("_total")
                }
                ejections = sum(r.ejections for r in attempts.replicas.values())
        finally:
            await fleet.close()
    elapsed = time.monotonic() - started

    outcomes = {i: Outcome(*o) for i, o in load.outcomes.items()}
    kinds = collections.Counter(o.kind for o in outcomes.values())
    broken = {i: o.detail for i, o in outcomes.items() if o.kind in ("broken", "stuck")}
    grown = {t: types_after[t] - n for t, n in types_before.items() if types_after[t] - n > 50}
    grown.update({t: n for t, n in types_after.items() if t not in types_before and n > 50})
    twice = [rid for rid in receptions.answered if receptions.live_answers(rid) > 1]
    FIGURES["soak"] = {
        "requests": REQUESTS,
        "warmup_requests": WARMUP,
        "streaming": sum(s.stream for s in specs),
        "long": sum(s.max_tokens in LONG_TOKENS for s in specs),
        "faults_injected": collections.Counter(a.split("@")[0] for a in applied),
        "faults": len(applied),
        "client_outcomes": dict(kinds),
        "lost": kinds["stuck"] + kinds["connection_error"],
        "slowest_request_s": round(max(o.elapsed for o in outcomes.values()), 2),
        "router_retries": retries,
        "ejections": ejections,
        "replica_revivals": fleet.revivals,
        "requests_reaching_more_than_one_replica": sum(
            1 for n in receptions.received.values() if n > 1
        ),
        "answered_by_a_replica_that_then_crashed_and_redone": sum(
            1 for n in receptions.answered.values() if n > 1
        )
        - len(twice),
        "answered_by_two_live_replicas_after_a_timeout": len(twice),
        "resources_before": before.as_dict(),
        "resources_after": after.as_dict(),
        "upstream_pool_before_after": [pool_before, pool_after],
        "log_records": dict(logs.by_kind.most_common(12)),
        "seconds": round(elapsed, 1),
    }

    # Nothing lost, nothing stuck, nothing half-answered without a clear error.
    assert len(outcomes) == REQUESTS
    assert not broken, f"{len(broken)} broken or stuck requests, e.g. {list(broken.items())[:5]}"
    assert kinds["connection_error"] == 0, kinds
    assert len(applied) == len(faults) >= 10
    # Failover hides almost every fault; what the clients see is bounded and explained.
    assert kinds["ok"] >= REQUESTS * 0.97, kinds
    # No request answered by two live replicas, except the race of an abandoned attempt: the
    # router gives up on a replica found hung and tries elsewhere while the first replica may
    # answer at that very moment. The client still gets one answer; such a request waited at
    # least the first-byte floor of the progress monitor, which is what is checked.
    timeout_s = MIN_FIRST_BYTE_S
    unexplained = [rid for rid in twice if outcomes[int(rid[5:])].elapsed < timeout_s]
    assert not unexplained, [
        (rid, specs[int(rid[5:])], outcomes[int(rid[5:])], receptions.answered_by[rid], applied)
        for rid in unexplained[:5]
    ]
    for index, outcome in outcomes.items():
        if outcome.kind in ("ok", "stream_cut"):
            assert receptions.answered[f"soak-{index}"] >= 1, (index, outcome)
    # The router logged failures as warnings, never an unhandled error.
    assert not logs.errors(), "\n".join(logs.error_texts)
    # Back to the starting level: connections, tasks, memory.
    extra_pooled = max(0, pool_after - pool_before)
    assert acquired == 0, where  # no upstream connection held outside the pool
    assert pool_after <= 2 * CONCURRENCY, where  # bounded by the peak, not by the request count
    assert after.fds <= before.fds + 2 * extra_pooled + 8, (before, after, where)
    assert after.tasks <= before.tasks + extra_pooled + 6, (before, after, where)
    assert after.objects - before.objects < REQUESTS // 2, sorted(
        grown.items(), key=lambda kv: -kv[1]
    )
    assert after.rss_kib - before.rss_kib < 96 * 1024, (before, after)
