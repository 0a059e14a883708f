"""Which replica gets the next request: a pure decision over plain replica states.

The proxy asks the Fleet for the healthy candidates that serve the requested model and hands
them to a Policy. Policies never do I/O and never wait, so they can run on every request and
be tested with hand-built states. Randomness and the clock are injected for the same reason.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from router.errors import ConfigError
from router.state import ReplicaState

#: Scraped engine gauges younger than this count fully (a few scrape intervals of 1 s).
FRESH_S = 3.0
#: ... and older than this not at all; in between their weight falls linearly to 0.
STALE_S = 10.0
#: Extra weight of a queued request on top of counting it once as busy: it waits for a whole
#: running request to finish before it even starts, so it costs about twice a running one.
WAITING_WEIGHT = 1.0
#: KV-cache usage above which the replica nears preemption (vLLM swaps/recomputes requests
#: when it runs out of blocks, which stalls everything running there).
KV_KNEE = 0.8
#: Multiplier on the load at a completely full KV cache (linear from KV_KNEE to 1.0).
KV_WEIGHT = 1.0
#: Scores closer than this are ties.
TIE_EPSILON = 1e-9


@dataclass(frozen=True)
class RequestInfo:
    """What the proxy knows about a request before sending it (no tokenizer: estimates)."""

    model: str | None
    prompt_tokens: int = 0
    max_tokens: int | None = None
    stream: bool = False


class Policy(Protocol):
    """A balancing rule. ``replicas`` is non-empty and already filtered to healthy candidates."""

    name: str

    def pick(self, replicas: Sequence[ReplicaState], request: RequestInfo) -> ReplicaState: ...


def freshness(replica: ReplicaState, now: float) -> float:
    """Weight in [0, 1] of the replica's scraped gauges, from their age.

    Scrapes run every ~1 s; a scrape older than FRESH_S means a few have failed in a row, and
    by STALE_S the numbers say little about the engine now, so they fade out linearly instead of
    flipping the ranking in one step.
    """
    if replica.scraped_at <= 0.0:
        return 0.0
    age = now - replica.scraped_at
    if age <= FRESH_S:
        return 1.0
    if age >= STALE_S:
        return 0.0
    return (STALE_S - age) / (STALE_S - FRESH_S)


def load_score(replica: ReplicaState, now: float | None = None) -> float:
    """How busy the replica is per unit of capacity; lower is better. 0 = idle.

    Formula, with w = freshness of the last scrape (1 when at most FRESH_S = 3 s old, falling
    linearly to 0 at STALE_S = 10 s, 0 when never scraped)::

        external = max(0, running + waiting - in_flight_at_scrape)
        busy     = in_flight + w * external
        queue    = WAITING_WEIGHT * w * waiting                       (WAITING_WEIGHT = 1)
        pressure = clamp((kv_cache_usage - KV_KNEE) / (1 - KV_KNEE), 0, 1)   (KV_KNEE = 0.8)
        score    = (busy + queue) / capacity * (1 + KV_WEIGHT * w * pressure)   (KV_WEIGHT = 1)

    Why this shape:

    - ``in_flight`` is the router's own count: exact and instant, so it carries everything
      this router does, including requests sent or finished since the last scrape.
    - The engine's ``running + waiting`` sees every client but is ~1 s old. It includes our
      requests; ``in_flight_at_scrape`` (our count when that scrape was taken) is subtracted so
      only load from *others* (other routers, direct clients) is added. The simpler
      ``max(in_flight, running + waiting)`` holds a stale floor for up to a scrape interval:
      when requests are shorter than that, a fast replica that just finished its requests still
      looks as busy as a slow one, ties break at random, and the slow replica gets more than its
      share (simulator, 4 closed-loop clients, one replica 8x slower: it served 6.0 of 24
      requests on average with max(), 5.3 with this formula, over 15 runs each).
    - A queued request waits for a running one to finish before starting, so queueing costs
      more latency than running concurrently: waiting requests count double.
    - Past ~80% KV-cache usage, new requests risk preempting running ones (recompute/swap),
      which stalls every request on that replica. The penalty multiplies the load rather than
      adding a fixed amount, because the usage is already a fraction of that replica's own cache
      and a fixed addend would be meaningless at high concurrency. At a full cache the load
      counts double.
    - Dividing by ``capacity`` lets a bigger replica (tensor-parallel or larger max_num_seqs)
      take proportionally more requests.
    - Stale gauges fade out through ``w``: then only ``in_flight`` counts, which is the best
      the router knows on its own.
    """
    if now is None:
        now = time.monotonic()
    w = freshness(replica, now)
    running = max(0.0, replica.running)
    waiting = max(0.0, replica.waiting)
    external = max(0.0, running + waiting - replica.in_flight_at_scrape)
    busy = max(0, replica.in_flight) + w * external
    queue = WAITING_WEIGHT * w * waiting
    pressure = min(1.0, max(0.0, (replica.kv_cache_usage - KV_KNEE) / (1.0 - KV_KNEE)))
    capacity = replica.capacity if replica.capacity > 0 and math.isfinite(replica.capacity) else 1.0
    return (busy + queue) / capacity * (1.0 + KV_WEIGHT * w * pressure)


class LeastBusy:
    """Send to the replica with the lowest load_score; break ties uniformly at random.

    Random tie-breaking matters: at low load every replica scores 0, and always taking the first
    would pile requests onto one replica between scrapes (in_flight breaks most ties, but not
    for requests that finish quickly).
    """

    name = "least-busy"

    def __init__(
        self,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock

    def pick(self, replicas: Sequence[ReplicaState], request: RequestInfo) -> ReplicaState:
        if not replicas:
            raise ValueError("pick() needs at least one candidate replica")
        now = self._clock()
        scores = [load_score(r, now) for r in replicas]
        best = min(scores)
        tied = [r for r, s in zip(replicas, scores, strict=True) if s - best <= TIE_EPSILON]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class RoundRobin:
    """Cycle through the candidates in URL order, ignoring load (a baseline for benchmarks).

    It remembers the last URL rather than an index, so the cycle stays fair when replicas join,
    leave or are filtered out by model.
    """

    name = "round-robin"

    def __init__(self) -> None:
        self._last: str | None = None

    def pick(self, replicas: Sequence[ReplicaState], request: RequestInfo) -> ReplicaState:
        if not replicas:
            raise ValueError("pick() needs at least one candidate replica")
        ordered = sorted(replicas, key=lambda r: r.url)
        chosen = ordered[0]
        if self._last is not None:
            chosen = next((r for r in ordered if r.url > self._last), ordered[0])
        self._last = chosen.url
        return chosen


#: Policy name -> factory(rng). New policies (e.g. "cost") register here.
POLICIES: dict[str, Callable[[random.Random | None], Policy]] = {
    LeastBusy.name: lambda rng: LeastBusy(rng),
    RoundRobin.name: lambda rng: RoundRobin(),
}


def policy_names() -> list[str]:
    """Valid values of --policy, for argparse ``choices`` and error messages."""
    return list(POLICIES)


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    """Build the policy named by --policy; unknown names are a ConfigError."""
    factory = POLICIES.get(name)
    if factory is None:
        raise ConfigError(
            f"--policy: unknown policy {name!r}; choose one of: {', '.join(policy_names())}"
        )
    return factory(rng)
