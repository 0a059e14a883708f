"""How busy a replica is, from what the router counts and what the engine's gauges said: the
load every policy starts from (no I/O, plain replica states).
"""

from __future__ import annotations

import time

from vllm_fleet.router.peers import peer_in_flight
from vllm_fleet.router.state import ReplicaState

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
    """How busy the replica is; lower is better. 0 = idle.

    Formula, with w = freshness of the last scrape (1 when at most FRESH_S = 3 s old, falling
    linearly to 0 at STALE_S = 10 s, 0 when never scraped)::

        external = max(0, running + waiting - in_flight_at_scrape - peers_at_scrape)
        busy     = in_flight + peers + w * external
        queue    = WAITING_WEIGHT * w * waiting                       (WAITING_WEIGHT = 1)
        pressure = clamp((kv_cache_usage - KV_KNEE) / (1 - KV_KNEE), 0, 1)   (KV_KNEE = 0.8)
        score    = (busy + queue) * (1 + KV_WEIGHT * w * pressure)   (KV_WEIGHT = 1)

    Why this shape:

    - ``in_flight`` is the router's own count: exact and instant, so it carries everything
      this router does, including requests sent or finished since the last scrape.
    - The engine's ``running + waiting`` sees every client but is ~1 s old. It includes our
      requests; ``in_flight_at_scrape`` (our count when that scrape was taken) is subtracted so
      only load from *others* (other routers, direct clients) is added.
    - ``peers``: peer routers' in-flight counts (vllm_fleet.router.peers), ~0.1 s old: they
      count at once like ours, and leave the gauges only what no router counts. The simpler
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
    - Stale gauges fade out through ``w``: then only ``in_flight`` counts, which is the best
      the router knows on its own.
    """
    if now is None:
        now = time.monotonic()
    busy, w, pressure = engine_load(replica, now)
    queue = WAITING_WEIGHT * w * max(0.0, replica.waiting)
    return (busy + queue) * (1.0 + KV_WEIGHT * w * pressure)


def engine_load(replica: ReplicaState, now: float) -> tuple[float, float, float]:
    """(requests on the replica, freshness w of its gauges, KV pressure in [0, 1]).

    Requests = our in-flight count and our peer routers' plus, weighted by w, the other
    clients' requests the last scrape saw (see load_score for why this combination).
    """
    w = freshness(replica, now)
    running = max(0.0, replica.running)
    waiting = max(0.0, replica.waiting)
    external = max(
        0.0, running + waiting - replica.in_flight_at_scrape - replica.peer_in_flight_at_scrape
    )
    busy = max(0, replica.in_flight) + peer_in_flight(replica, now) + w * external
    pressure = min(1.0, max(0.0, (replica.kv_cache_usage - KV_KNEE) / (1.0 - KV_KNEE)))
    return busy, w, pressure
