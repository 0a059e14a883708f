"""Which failures say "this replica is broken" and which say "this request is bad".

A replica answering 500 is usually telling us about the request (an input that crashes a
handler), not about itself: every replica would answer it the same way. Counting such answers
toward the circuit breaker lets one client eject the whole fleet by sending a few poison
requests. So, as Envoy separates ``consecutive_gateway_failure`` from ``consecutive_5xx``:

- **gateway failures** (refused or reset connections, timeouts, broken framing, a hung
  replica, and the gateway statuses 502/503/504) count toward the breaker's consecutive
  failures (vllm_fleet.router.health.record_failure);
- **other 5xx answers** only feed a per-replica error rate, exponentially forgotten over
  ``WINDOW_S``. A replica is an outlier, and is ejected, when its rate is both high in absolute
  terms and far above its peers' (a poison request costs every replica alike, so it moves no
  replica away from its peers).

Every ejection by passive outcomes is capped by ``may_eject``: at most
``max_ejection_percent`` of the fleet (at least one replica) may be held out by the breaker at
once, as Envoy's ``max_ejection_percent``. What is left of a fleet is better than a 503.

Pure functions over plain records: the clock is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from vllm_fleet.router.state import Outcomes, ReplicaState

#: Outcomes older than this weigh 1/e; a few seconds of traffic at tens of requests per second.
WINDOW_S = 10.0
#: Weighted answers a replica needs before its error rate is judged (no verdict on 3 requests).
MIN_VOLUME = 5.0
#: A rate below this never ejects: the 500s are retried elsewhere and the replica still answers
#: most requests.
MIN_OUTLIER_RATE = 0.5
#: ... and the rate must exceed the mean of its peers' rates by this much.
MIN_GAP = 0.3
#: Gateway statuses: the replica (or a proxy in front of it) could not answer at all.
GATEWAY_STATUSES = frozenset({502, 503, 504})


def is_gateway_failure(reason: str, status: int) -> bool:
    """A failure that says the replica, not the request, is in trouble."""
    return reason != "status" or status in GATEWAY_STATUSES


def _decay(o: Outcomes, now: float) -> None:
    """Forget ``o``'s outcomes exponentially up to ``now``."""
    if o.at <= 0.0 or now <= o.at:
        o.at = max(o.at, now)
        return
    factor = math.exp(-(now - o.at) / WINDOW_S)
    o.requests *= factor
    o.errors *= factor
    o.at = now


def record_answer(o: Outcomes, now: float, *, error: bool) -> None:
    """One answer from the replica: a 5xx (``error``) or not."""
    _decay(o, now)
    o.requests += 1.0
    if error:
        o.errors += 1.0


def error_rate(o: Outcomes, now: float) -> float | None:
    """The replica's recent 5xx share, or None while it has answered too few requests."""
    _decay(o, now)
    if o.requests < MIN_VOLUME:
        return None
    return o.errors / o.requests


def is_outlier(replica: ReplicaState, peers: Sequence[ReplicaState], now: float) -> bool:
    """Is ``replica``'s 5xx rate high and far above its peers' (those with enough volume)?

    With no judged peer the gap is measured against 0: a lone replica failing most requests is
    ejected, and then served in panic mode if it is the only one left (vllm_fleet.router.state).
    """
    rate = error_rate(replica.outcomes, now)
    if rate is None or rate < MIN_OUTLIER_RATE:
        return False
    rates = [
        r for p in peers if p is not replica and (r := error_rate(p.outcomes, now)) is not None
    ]
    baseline = sum(rates) / len(rates) if rates else 0.0
    return rate - baseline >= MIN_GAP


def may_eject(ejected: int, total: int, max_ejection_percent: float) -> bool:
    """May one more replica be ejected, with ``ejected`` of ``total`` already out?

    At most ``max_ejection_percent`` of the fleet, rounded down, but always at least one
    replica (Envoy's rule), so a two-replica fleet can still eject its broken half.
    """
    allowed = max(1, math.floor(total * max_ejection_percent / 100.0 + 1e-9))
    return ejected < allowed
