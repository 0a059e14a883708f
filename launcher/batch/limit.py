"""How many requests a batch keeps in flight: an adaptive concurrency limit.

Why adaptive: a continuous-batching engine's throughput grows with the requests it runs at
once, up to its batch limit (``max_num_seqs``, or fewer when the KV cache is full), and is flat
beyond it: more requests only wait in its queue, slow every interactive request sharing the
fleet, and are lost work when the batch is stopped. The best limit is therefore "every batch
full, plus a small queue so a finished request is replaced at once", and it moves as replicas
come and go and as prompts change length. The limit follows it the way Netflix's
concurrency-limits and Envoy's adaptive concurrency filter do, once per window (a second):

1. **Overload** (any 429, 503 or refused connection in the window): multiply the limit by
   `LimitSettings.decrease` (0.7): AIMD's multiplicative decrease.
2. **Not limit-bound** (the window never had `limit` requests in flight, e.g. the input ran
   out): hold. Latency then says nothing about the limit.
3. **Engine queue known** (the router's ``/fleet/replicas`` or vLLM's ``/metrics``
   ``vllm:num_requests_waiting``, summed over replicas): aim at ``target = queue_per_replica x
   replicas`` waiting requests. In slow start (no queue seen yet) the limit doubles while the
   queue is below target, deciding every half second, but only on a view that has seen what
   was sent: the router scrapes its replicas once a second and a loaded vLLM API server
   counts a request only once it has parsed and tokenized it, so a view where the engines
   report fewer requests (running + waiting) than the endpoint has out to them predates the
   last doubling and its queue is no evidence (doubling on it every half second went past
   1,000 on two real vLLM CPU replicas that run 256 between them). Slow start holds for up to
   `MAX_LAG_HOLDS` such windows, then counts the unseen requests as waiting. Afterwards the
   limit moves by half the gap,
   ``limit += (target - waiting) / 2`` (a proportional step: the queue is the error signal,
   the limit the actuator), at least one request a window upwards, and by a quarter of itself
   when nothing waits at all (the engines have idle slots: after a decrease, or when replicas
   join, the limit is far below capacity and steps of half the target would take minutes).
4. **No queue signal** (any other OpenAI-compatible server): Netflix's Gradient2 on seconds per
   output token, ``gradient = clamp(tolerance x long / short, 0.5, 1)``, ``new = limit x
   gradient + sqrt(limit)``, smoothed by `smoothing`; ``long`` is a slow average of ``short``
   (the window's median). Slow start doubles until the gradient first drops below 1. The
   tolerance (2) leaves room for the step time's own growth with batch size.

All state changes go through `AdaptiveLimit` methods that take the time as an argument, so the
rule is tested with a fake clock.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

#: Where the probe starts, per replica: well below vLLM's default batch limits (max_num_seqs
#: of 256 to 1024 in vLLM 0.32's API server, by device), so the start never floods a fleet;
#: slow start finds the rest.
PROBE_START_PER_REPLICA = 16
#: Growth a window while the engines have no queue at all (rule 3).
IDLE_GROWTH = 0.25
#: Slow-start windows held on a lagging view (rule 3) before its unseen requests are counted
#: as waiting: 3 s at half-second windows, three of the router's scrapes.
MAX_LAG_HOLDS = 6


@dataclass(frozen=True)
class LimitSettings:
    min_limit: int = 1
    max_limit: int = 4096
    #: Seconds between decisions.
    window_s: float = 1.0
    #: Seconds between decisions in slow start: the probe should take seconds, not a minute,
    #: and a limit that doubles past the fleet only queues a little until the next decision.
    slow_start_window_s: float = 0.5
    #: Multiplicative decrease on overload.
    decrease: float = 0.7
    #: Waiting requests per replica the limit aims at (queue signal): enough that a replica
    #: never idles between a finish and our next request, few enough to stay polite.
    queue_per_replica: float = 2.0
    #: Gradient2: latency rise tolerated before the limit shrinks, and how fast it moves.
    tolerance: float = 2.0
    smoothing: float = 0.2
    #: Gradient2's long average: weight of each new window.
    long_weight: float = 0.05


@dataclass(frozen=True)
class QueueSignal:
    """The engines' queue as last observed: summed waiting requests and healthy replicas,
    and, when known, how many requests the engines reported at all (``seen``: running +
    waiting) against how many the endpoint has out to them (``sent``)."""

    waiting: float
    replicas: int
    seen: float | None = None
    sent: float | None = None

    @property
    def unseen(self) -> float:
        """Requests sent that the view does not show yet (0 when not known)."""
        if self.seen is None or self.sent is None:
            return 0.0
        return max(0.0, self.sent - self.seen)


@dataclass
class AdaptiveLimit:
    """The current limit and what the window so far has seen. Not thread-safe (asyncio)."""

    limit: int
    settings: LimitSettings = field(default_factory=LimitSettings)
    #: Doubling until the first sign of a queue or overload.
    slow_start: bool = True
    window_start: float = 0.0
    _latencies: list[float] = field(default_factory=list, repr=False)
    _overloaded: int = 0
    _peak_in_flight: int = 0
    _queue: QueueSignal | None = None
    _long: float | None = None
    _lag_holds: int = 0
    #: Decisions taken (for tests and the summary).
    decisions: int = 0

    def __post_init__(self) -> None:
        self.limit = self._clamp(self.limit)

    def _clamp(self, value: float) -> int:
        s = self.settings
        return max(s.min_limit, min(s.max_limit, int(value)))

    # -- what happens during a window ------------------------------------------------------

    def on_start(self, in_flight: int) -> None:
        """A request was sent; ``in_flight`` counts it."""
        self._peak_in_flight = max(self._peak_in_flight, in_flight)

    def on_done(self, latency_s: float, output_tokens: int) -> None:
        """A request answered (2xx or a final error that is not overload)."""
        self._latencies.append(latency_s / max(1, output_tokens))

    def on_overload(self) -> None:
        """A 429, 503 or refused connection: the fleet says it has too much."""
        self._overloaded += 1

    def on_queue(self, signal: QueueSignal | None) -> None:
        self._queue = signal

    # -- the decision ----------------------------------------------------------------------

    def update(self, now: float) -> int:
        """The limit in force at ``now``; decides once a window has passed."""
        window = self.settings.slow_start_window_s if self.slow_start else self.settings.window_s
        if now - self.window_start < window:
            return self.limit
        self.limit = self._clamp(self._decide())
        self.decisions += 1
        self.window_start = now
        self._latencies.clear()
        self._overloaded = 0
        self._peak_in_flight = 0
        return self.limit

    def _decide(self) -> float:
        s = self.settings
        if self._overloaded:
            self.slow_start = False
            return math.floor(self.limit * s.decrease)
        if self._peak_in_flight < self.limit:
            return self.limit
        if self._queue is not None:
            return self._queue_rule(self._queue)
        return self._gradient_rule()

    def _queue_rule(self, queue: QueueSignal) -> float:
        target = max(1.0, self.settings.queue_per_replica * max(1, queue.replicas))
        if self.slow_start:
            if queue.unseen > 0 and self._lag_holds < MAX_LAG_HOLDS:
                self._lag_holds += 1
                return self.limit
            self._lag_holds = 0
            if queue.waiting + queue.unseen < target:
                return self.limit * 2
            self.slow_start = False
        step = (target - queue.waiting) / 2.0
        if step > 0:
            step = max(1.0, step)
        if queue.waiting <= 0:
            step = max(step, self.limit * IDLE_GROWTH)
        return self.limit + step

    def _gradient_rule(self) -> float:
        if not self._latencies:
            return self.limit
        s = self.settings
        short = statistics.median(self._latencies)
        if self._long is None:
            self._long = short
        else:
            self._long = (1 - s.long_weight) * self._long + s.long_weight * short
        gradient = max(0.5, min(1.0, s.tolerance * self._long / short))
        if self.slow_start:
            if gradient >= 1.0:
                return self.limit * 2
            self.slow_start = False
        new = self.limit * gradient + math.sqrt(self.limit)
        return (1 - s.smoothing) * self.limit + s.smoothing * new


def initial_limit(capacities: list[float | None], queue_per_replica: float) -> tuple[int, bool]:
    """(starting limit, slow start) from each healthy replica's batch limit (None: unknown).

    Known capacity: start at the fleet's batch capacity plus the target queue, no slow start.
    Unknown (a fresh router that has not seen a full batch, or not our router): start at
    `PROBE_START_PER_REPLICA` a replica and let slow start double it every half second.
    """
    replicas = max(1, len(capacities))
    known = [c for c in capacities if c is not None and c > 0]
    if capacities and len(known) == len(capacities):
        return max(1, math.ceil(sum(known) + queue_per_replica * replicas)), False
    return PROBE_START_PER_REPLICA * replicas, True
