"""Batch traffic yields to interactive traffic: which requests are batch, and where they may go.

A request is batch when it carries ``X-Fleet-Priority: batch`` (``vllm-fleet batch`` sends it,
with vLLM's ``priority`` field in the body set low, 10 by default). Everything else is
interactive. The engines order their own queue by the body's ``priority`` when started with
``--scheduling-policy priority``; what an engine cannot do is give back a running slot: vLLM
0.32 preempts only for KV blocks, so an interactive request that finds every ``max_num_seqs``
slot taken by batch requests waits for one of them to finish. The router therefore keeps slots
free for interactive requests. The rule (`BatchGate.with_room`):

    limit   = the replica's learned batch limit (router.speed: the running count at which it
              queues), else the mean of the fleet's learned ones; none learned -> no rule
    reserve = max(1, ceil(RESERVE_FRACTION * limit))   while interactive requests came within
              INTERACTIVE_MEMORY_S; 0 otherwise (a batch alone may fill the fleet)
    room    = busy + 1 <= limit - reserve               (busy: load.engine_load, every
                                                         client's requests, ours exact)

A batch request goes only to a replica with room, chosen among those by the policy as usual
(the cost policy then takes the one where it adds least to the running requests); when no
replica has room it waits at the router, first come first served, until one has. Never lost,
never starved: after MAX_HOLD_S it goes anyway, to the policy's pick among every candidate,
where the engine's priority queue still puts it behind interactive requests. Interactive
requests are never held and are priced as before: the batch work this router holds back is
not on any engine, so nothing queued there is batch work of ours to ignore.

Why reserve slots rather than only rely on the engines' priority queue: with the batch filling
every slot, an interactive request waits for the next batch request to finish, on average a
batch request's duration over the batch limit, and its tail is several times that. Measured
with tests/launcher/batch/test_priority_fleet.py's fleet (2 simulators, max_num_seqs 8, a
batch beside 40 streamed chats), interactive TTFT p99 against the same load alone: x3.7 with
fcfs engines and no reserve, x1.55 with priority engines and no reserve, x0.9-1.3 with both.
Bench scenario 11 (docs/benchmarks.md) measures the whole on a larger fleet.

The batch client learns how much the router holds: ``/fleet/replicas`` shows the held requests
as ``batch_held`` (spread evenly over the healthy replicas, since a held request goes to
whichever frees first), and ``vllm-fleet batch`` counts them as queued, so its adaptive limit
stops growing while the router holds its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

from vllm_fleet.router.balancer import Policy, RequestInfo, fleet_defaults
from vllm_fleet.router.load import engine_load
from vllm_fleet.router.state import ReplicaState

#: The header that marks a request's class, and its batch value (case-insensitive).
PRIORITY_HEADER = "X-Fleet-Priority"
BATCH = "batch"
#: Share of each replica's batch limit kept free for interactive requests (at least 1 slot).
RESERVE_FRACTION = 0.25
#: The reserve is kept while an interactive request came within this many seconds. Long: the
#: first interactive request after it lapsed finds the slots full and waits for a batch one.
INTERACTIVE_MEMORY_S = 300.0
#: The longest a batch request waits at the router for room before it goes anyway.
MAX_HOLD_S = 30.0
#: How often the first waiting batch request looks for room (the others wait their turn).
HOLD_POLL_S = 0.02


@dataclass(frozen=True)
class PrioritizedRequest(RequestInfo):
    """A RequestInfo that knows its class (the proxy builds it from the header)."""

    batch: bool = False


def is_batch(request: RequestInfo) -> bool:
    return isinstance(request, PrioritizedRequest) and request.batch


def classify(info: RequestInfo, headers: Mapping[str, str]) -> RequestInfo:
    """``info`` marked batch when ``X-Fleet-Priority: batch`` came with the request."""
    value = headers.get(PRIORITY_HEADER)
    if value is None or value.strip().lower() != BATCH:
        return info
    values = {f.name: getattr(info, f.name) for f in fields(info)}
    values["batch"] = True
    return PrioritizedRequest(**values)


class BatchGate:
    """Where batch requests have room, and the line they wait in when none has (one per app)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        reserve_fraction: float = RESERVE_FRACTION,
        interactive_memory_s: float = INTERACTIVE_MEMORY_S,
        max_hold_s: float = MAX_HOLD_S,
        poll_s: float = HOLD_POLL_S,
    ) -> None:
        self._clock = clock
        self.reserve_fraction = reserve_fraction
        self.interactive_memory_s = interactive_memory_s
        self.max_hold_s = max_hold_s
        self.poll_s = poll_s
        self.last_interactive = -math.inf
        #: Batch requests waiting for room now, and how many went anyway after MAX_HOLD_S.
        self.held = 0
        self.overdue = 0
        self._line: deque[asyncio.Event] = deque()

    def saw_interactive(self, now: float) -> None:
        self.last_interactive = now

    def reserve(self, limit: float, now: float) -> float:
        """Slots of a replica with batch limit ``limit`` kept for interactive requests."""
        if now - self.last_interactive > self.interactive_memory_s:
            return 0.0
        return float(max(1, math.ceil(self.reserve_fraction * limit)))

    def with_room(self, replicas: Sequence[ReplicaState], now: float) -> list[ReplicaState]:
        """The replicas a batch request may go to now (module docstring: the rule)."""
        if not replicas:
            return []
        fleet_limit = fleet_defaults(replicas)[0].batch_limit
        roomy = []
        for replica in replicas:
            learned = replica.speed.batch_limit
            limit = learned if learned is not None else fleet_limit
            if not math.isfinite(limit):
                roomy.append(replica)  # nothing known about its limit: no rule to apply
                continue
            busy = engine_load(replica, now)[0]
            if busy + 1.0 <= limit - self.reserve(limit, now):
                roomy.append(replica)
        return roomy

    async def wait_for_room(self, candidates: Callable[[], Sequence[ReplicaState]]) -> float:
        """Wait, in arrival order, until a candidate has room or MAX_HOLD_S passed; the seconds
        waited. Returns without waiting when nobody is in line and a replica has room."""
        if not self._line and self.with_room(candidates(), self._clock()):
            return 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.max_hold_s
        turn = asyncio.Event()
        self._line.append(turn)
        if self._line[0] is turn:
            turn.set()
        self.held += 1
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(turn.wait(), self.max_hold_s)
            while loop.time() < deadline:
                if self.with_room(candidates(), self._clock()):
                    return loop.time() - started
                await asyncio.sleep(min(self.poll_s, max(0.0, deadline - loop.time())))
            self.overdue += 1
            return loop.time() - started
        finally:
            self.held -= 1
            first = self._line[0] is turn
            self._line.remove(turn)
            if first and self._line:
                self._line[0].set()


class BatchAware:
    """Any policy, with batch requests kept to replicas that have room (BatchGate.with_room).

    Interactive requests go to ``inner`` unchanged (and keep the reserve alive); a batch
    request is offered only the replicas with room, or every candidate when none has (it was
    held at the router until MAX_HOLD_S ran out).
    """

    def __init__(self, inner: Policy, gate: BatchGate, clock: Callable[[], float] = time.monotonic):
        self.inner = inner
        self.gate = gate
        self.name = inner.name
        self._clock = clock

    def pick(self, replicas: Sequence[ReplicaState], request: RequestInfo) -> ReplicaState:
        now = self._clock()
        if not is_batch(request):
            self.gate.saw_interactive(now)
            return self.inner.pick(replicas, request)
        roomy = self.gate.with_room(replicas, now)
        return self.inner.pick(roomy or replicas, request)
