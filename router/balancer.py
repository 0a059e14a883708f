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
from typing import NamedTuple, Protocol

from vllm_fleet.router.block_hashes import PromptBlocks
from vllm_fleet.router.errors import ConfigError
from vllm_fleet.router.guessed_limit import holder_limit, holder_queue_weight
from vllm_fleet.router.load import KV_WEIGHT, engine_load, load_score
from vllm_fleet.router.precise import cached_prefix_tokens
from vllm_fleet.router.prefill_backlog import PREFILL_WEIGHT, PrefillBacklog
from vllm_fleet.router.prefix_home import home
from vllm_fleet.router.speed import B_PRIOR, SpeedEstimate
from vllm_fleet.router.state import ReplicaState

#: Scores closer than this are ties.
TIE_EPSILON = 1e-9


@dataclass(frozen=True)
class RequestInfo:
    """What the proxy knows about a request before sending it (no tokenizer: estimates)."""

    model: str | None
    prompt_tokens: int = 0
    max_tokens: int | None = None
    stream: bool = False
    #: Chained keys of the routing text's 128-byte blocks
    #: (vllm_fleet.router.prefix_index.prefix_keys): what a replica may hold cached of this prompt.
    #: Empty when the body has no prompt.
    prefix: tuple[int, ...] = ()
    #: vLLM's own block hashes of the prompt, where a candidate's KV events are live and the
    #: model's tokenizer is loaded (vllm_fleet.router.prompt_tokens); None otherwise.
    blocks: PromptBlocks | None = None


class Policy(Protocol):
    """A balancing rule. ``replicas`` is non-empty and already filtered to healthy candidates."""

    name: str

    def pick(self, replicas: Sequence[ReplicaState], request: RequestInfo) -> ReplicaState: ...


def lowest(
    replicas: Sequence[ReplicaState], scores: Sequence[float], margin: float, rng: random.Random
) -> ReplicaState:
    """The replica with the lowest score; scores within ``margin`` of it tie and one of them is
    drawn at random, so equal replicas share the load instead of the first taking it all."""
    best = min(scores)
    tied = [r for r, s in zip(replicas, scores, strict=True) if s - best <= margin]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def _require(replicas: Sequence[ReplicaState]) -> None:
    if not replicas:
        raise ValueError("pick() needs at least one candidate replica")


class _Scored:
    """Base of the load-aware policies: an injected rng for ties and a clock for freshness."""

    def __init__(
        self,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock


class LeastBusy(_Scored):
    """Send to the replica with the lowest load_score; break ties uniformly at random.

    Random tie-breaking matters: at low load every replica scores 0, and always taking the first
    would pile requests onto one replica between scrapes (in_flight breaks most ties, but not
    for requests that finish quickly).
    """

    name = "least-busy"

    def pick(self, replicas: Sequence[ReplicaState], request: RequestInfo) -> ReplicaState:
        _require(replicas)
        now = self._clock()
        scores = [load_score(r, now) for r in replicas]
        return lowest(replicas, scores, TIE_EPSILON, self._rng)


class RoundRobin:
    """Cycle through the candidates in URL order, ignoring load (a baseline for benchmarks).

    It remembers the last URL rather than an index, so the cycle stays fair when replicas join,
    leave or are filtered out by model.
    """

    name = "round-robin"

    def __init__(self) -> None:
        self._last: str | None = None

    def pick(self, replicas: Sequence[ReplicaState], request: RequestInfo) -> ReplicaState:
        _require(replicas)
        ordered = sorted(replicas, key=lambda r: r.url)
        chosen = ordered[0]
        if self._last is not None:
            chosen = next((r for r in ordered if r.url > self._last), ordered[0])
        self._last = chosen.url
        return chosen


#: Tokens assumed for a request without max_tokens until the replicas' counters say how long
#: requests are (generated tokens per finished request; it only scales the estimate).
DEFAULT_TOKENS = 256.0
#: Finished requests (exponentially forgotten, summed over candidates) before the learned mean
#: request length replaces DEFAULT_TOKENS.
MIN_FINISHED_FOR_MEAN = 4.0
#: Price of one place in a replica's queue, in mean requests run on a full batch (see
#: request_cost).
QUEUE_PLACE_REQUESTS = 2.0
#: Costs within this relative distance of the best are ties, broken at random.
COST_TIE = 1e-9
#: Price of caching a prefix a second time, per token, in prefill times (see request_cost).
DUPLICATE_WEIGHT = 1.0
#: Prefill seconds per prompt token, in empty-batch decode steps, until a replica's
#: vllm:request_prefill_time_seconds says (a GPU prefills a token in ~1/100 to 1/300 of a
#: decode step; the tiny model on 2 shared CPU cores learned 1.5e-5 to 5.4e-5 s per computed
#: token against 5.6 to 28 ms steps, 1/200 to 1/1,000: the prior errs toward pricing prompts).
PREFILL_STEP_PRIOR = 0.01


class Speed(NamedTuple):
    """The speed numbers the cost formula uses for one replica (learned or filled in)."""

    token_s: float
    batch_slowdown: float
    batch_limit: float
    prefill_s_per_token: float
    #: True when ``batch_limit`` is only the most the replica has been seen running (no
    #: replica of the fleet has queued yet): a guess, not a measurement (see request_cost).
    limit_assumed: bool = False
    #: The most any candidate has been seen running (vllm_fleet.router.guessed_limit).
    fleet_peak: float = 0.0


def fleet_defaults(replicas: Sequence[ReplicaState]) -> tuple[Speed, float]:
    """(speed assumed for a replica not measured yet, typical tokens per request).

    An unmeasured replica (just joined, or never scraped) is assumed to be an average one: the
    mean of the measured replicas' numbers, batch limit included (replicas of one fleet mostly
    share max_num_seqs; one that never queued yet is assumed to queue where the others do).
    With none measured every replica gets the same speed and the cost orders replicas by their
    load, like least-busy. The typical length is pooled over the candidates: generated tokens
    / finished requests, both recent.
    """
    known = prefill_known = 0
    token_s = slowdown = prefill = tokens = finished = 0.0
    limits: list[float] = []
    peak = 0.0
    for r in replicas:
        e = r.speed
        peak = max(peak, e.peak_running)
        if e.token_s is not None:
            known += 1
            token_s += e.token_s
            slowdown += e.batch_slowdown
        if e.prefill_s_per_token > 0:
            prefill_known += 1
            prefill += e.prefill_s_per_token
        if e.batch_limit is not None:
            limits.append(e.batch_limit)
        tokens += e.recent_tokens
        finished += e.recent_finished
    if known:
        token_s, slowdown = token_s / known, slowdown / known
    else:
        token_s, slowdown = 1.0, B_PRIOR
    prefill = prefill / prefill_known if prefill_known else 0.0  # 0: replica_speed's prior
    limit = sum(limits) / len(limits) if limits else math.inf
    typical = tokens / finished if finished >= MIN_FINISHED_FOR_MEAN else DEFAULT_TOKENS
    return Speed(token_s, slowdown, limit, prefill, fleet_peak=peak), max(1.0, typical)


def replica_speed(estimate: SpeedEstimate, default: Speed) -> Speed:
    """The replica's learned numbers, each filled in from ``default`` where not learned yet.

    The batch limit is only learned once a replica queues, which a fresh router may not see
    before its first burst of traffic. Until any replica has queued, each is assumed full at
    the most it has been seen running: going past that is a risk the cost prices like a
    queue, so a burst spreads over the fleet instead of stacking on the fast replicas beyond
    their (unknown) limit. Measured: TTFT p99 at 80% load x2.1 of least-busy without this,
    x1.1 with it (discrete-event model of the bench fleet, 8 runs of 30 s).
    """
    if estimate.token_s is None:
        token_s, slowdown = default.token_s, default.batch_slowdown
    else:
        token_s, slowdown = estimate.token_s, estimate.batch_slowdown
    prefill = estimate.prefill_s_per_token or default.prefill_s_per_token
    if prefill <= 0:  # no replica exports prefill times yet: a prompt token is not free
        prefill = token_s * PREFILL_STEP_PRIOR
    if estimate.batch_limit is not None:
        limit = estimate.batch_limit
    elif math.isfinite(default.batch_limit):  # the fleet's, unless it already ran more
        limit = max(default.batch_limit, estimate.peak_running)
    else:  # no replica has queued yet: going past what it has been seen running is a risk
        peak = max(1.0, estimate.peak_running)
        return Speed(token_s, slowdown, peak, prefill, True, default.fleet_peak)
    return Speed(token_s, slowdown, limit, prefill)


def request_cost(
    replica: ReplicaState,
    request: RequestInfo,
    speed: Speed,
    typical_tokens: float,
    now: float,
    *,
    cached: float | None = None,
    held_elsewhere: float = 0.0,
    backlog: float = 0.0,
) -> float:
    """Seconds this request costs the fleet on ``replica``: its own expected latency there plus
    the delay it adds to the requests already running there. Lower is better.

    With ``a, b`` = the replica's learned empty-batch step time and batch slowdown (one decode
    step takes ``a * (1 + b * n)`` with n requests running), ``C`` its batch limit (see
    replica_speed), ``s`` its prefill seconds per computed prompt token (learned, else
    PREFILL_STEP_PRIOR * a), ``p = s x PREFILL_WEIGHT`` (= 8) the price of a prefill second
    on a first token's path (vllm_fleet.router.prefill_backlog says why), ``D`` the learned
    mean tokens per request, ``w`` the freshness of its last scrape (see load.freshness)::

        T      = max_tokens, or D when the request gives none
        P      = prompt tokens the replica must compute: (body bytes / 4 (no tokenizer in
                 the router) minus the prefix the replica is predicted to hold cached
                 (ReplicaPrefixes.cached_tokens: matched bytes / 4, whole KV blocks, x trust;
                 where the replica's KV events are live, the share of the prompt its blocks
                 hold by vLLM's own hashes: vllm_fleet.router.precise.cached_prefix_tokens))
                 x the replica's real tokens per estimated token (ReplicaPrefixes.token_scale)
        N      = in_flight + w * other clients' running + waiting     (as in load.load_score)
        n      = min(N + 1, C)                          batch size while this request runs
        queue  = max(0, N + 1 - C) * QUEUE_PLACE_REQUESTS * a * (1 + b * C) * D
                 x (P / (prompt x scale))^2, and C at least the fleet's peak, when C is only
                 assumed (Speed.limit_assumed) and K > 0
        Q      = prompt tokens this router sent the replica and it has probably not prefilled
                 yet (vllm_fleet.router.prefill_backlog; ``backlog`` passes Q)
        own    = queue + Q * p + P * p + T * a * (1 + b * n)
        impose = min(N, C) * (a * b * min(T, D) + P * s)
        dup    = max(0, H - K) * scale * p * DUPLICATE_WEIGHT
        cost   = (own + impose + dup) * (1 + KV_WEIGHT * w * kv_pressure)  (kv_pressure: load_score)

    with ``K`` the prefix tokens this replica holds and ``H`` the most any candidate holds
    (``held_elsewhere``; ``cached`` passes K when the caller computed it already).

    Why this shape (a discrete-event model of the bench's scenario 1 fleet: 4 replicas, one at
    half speed, 70% load, 8 runs of 30 s, against join-shortest-queue with exact counts; the
    bench itself agrees on mean and p99, see docs/benchmarks.md):

    - ``own`` alone is "remaining work / speed" for this one request: it sends long requests
      to fast replicas, which is where the tail comes from (p99 x0.63), but nothing stops it
      from stacking short requests on a slow replica.
    - ``impose`` is what the request costs the others: each of the ``min(N, C)`` running
      requests gets ``a * b`` slower per step for as long as both run, at most T steps and
      typically about a mean request (D). Capped at D, it makes a busy fast replica cheaper
      for long requests than for short ones, which go to a quiet slow replica instead (TTFT
      p99 x0.67 with it, x0.93 without).
    - ``queue``: once the batch is full a new request waits for others to finish and streams
      nothing meanwhile. A place in line is priced at QUEUE_PLACE_REQUESTS = 2 mean requests
      on a full batch, not at the mean gap between completions (1/C of one): with the mean
      gap, TTFT p99 at 85% load was x5.8; with 1, 2, 3 requests x2.4, x1.9, x1.7 while p99
      latency went x0.68, x0.68, x0.69 and at 95% load x0.65, x0.66, x0.70.
    - The prompt costs its own prefill and stalls the running requests for as long. The
      prefill on this request's own path (``P``, and the backlog ``Q`` ahead of it) delays
      its first token and is priced at ``p``; the stall of the running requests is one late
      token each, priced at its measured seconds ``s``. Only the tokens the replica must
      compute count: a cached prefix makes a replica cheaper by
      exactly the prefill it saves, nothing more. So a prefix group sticks to the replicas
      that hold it while the saving beats their extra load, and spreads as soon as one of
      them queues (the queue term grows by whole mean requests, the saving stays fixed);
      a request that shares only a few blocks saves a few tokens' prefill, far less than
      one more running request costs (tests/router/test_prefix_cost.py shows both).
    - A limit no replica has confirmed by queueing is a guess: where the replica holds part
      of the prompt it is raised to the fleet's peak and weighed by the squared share still to
      compute (vllm_fleet.router.guessed_limit says why).
    - ``dup``: computing a prefix that another replica already holds caches it a second time,
      and on a full cache that evicts some other group's blocks, which a later request then
      computes again: about as much prefill as the duplicate itself (DUPLICATE_WEIGHT = 1).
      Without it the fleet's caches fill with copies of the busiest groups and hold fewer
      groups in all (scenario 8: hit rate 81 % of the best possible; a consistent hash that
      never duplicates, 84 %). A prefix no replica holds costs nothing extra anywhere (it
      must be computed once somewhere), so traffic without shared prefixes (scenarios 1-3)
      is priced exactly as before.
    - ``Q * p``: a first token also waits for the prompts sent before it to be prefilled (a
      step computes only so many tokens), which request counts do not show: a replica running
      two cold prefills looks as busy as one running two decodes. In scenario 8, 21 of the 22
      slowest first tokens had been sent to a replica still prefilling a cold prompt; with
      the backlog the next cold prompt goes elsewhere (TTFT p99 and the run-to-run figures:
      bench/findings.md, issue 17 session 24).
    - Speeds are per replica and learned (vllm_fleet.router.speed): the measured speed and batch
      limit say how much a replica can take, so a bigger one (tensor-parallel, larger max_num_seqs)
      shows up as a faster or wider one.

    O(1) per replica: no per-request bookkeeping beyond the in-flight count.
    """
    busy, w, pressure = engine_load(replica, now)
    a, b, limit = speed.token_s, speed.batch_slowdown, speed.batch_limit
    tokens = float(request.max_tokens) if request.max_tokens is not None else typical_tokens
    tokens = max(1.0, tokens)
    prefixes = replica.prefixes
    if cached is None:
        prompt = request.prompt_tokens
        cached = cached_prefix_tokens(replica, request.prefix, request.blocks, prompt)
    computed = max(0.0, request.prompt_tokens - cached) * prefixes.token_scale
    stall = computed * speed.prefill_s_per_token
    p = speed.prefill_s_per_token * PREFILL_WEIGHT
    prefill = computed * p
    duplicate = max(0.0, held_elsewhere - cached) * prefixes.token_scale * p * DUPLICATE_WEIGHT
    assumed = speed.limit_assumed
    limit = holder_limit(limit, assumed, speed.fleet_peak, cached)
    batch = min(busy + 1.0, limit)
    ahead = max(0.0, busy + 1.0 - limit)
    # ``ahead`` > 0 only when the limit is finite (0 * inf would be NaN).
    queue = ahead * QUEUE_PLACE_REQUESTS * a * (1.0 + b * limit) * typical_tokens if ahead else 0.0
    queue *= holder_queue_weight(
        assumed, cached, computed, request.prompt_tokens * prefixes.token_scale
    )
    own = queue + backlog * p + prefill + tokens * a * (1.0 + b * batch)
    impose = min(busy, limit) * (a * b * min(tokens, typical_tokens) + stall)
    return (own + impose + duplicate) * (1.0 + KV_WEIGHT * w * pressure)


class CostAware(_Scored):
    """Send to the replica where the request costs least (request_cost), ties at random.

    Knows each request's size (max_tokens, prompt) and each replica's learned speed, so long
    requests go where they finish soonest and short ones fill whichever batch they slow least.
    Before any speed is learned it behaves like least-busy.
    """

    name = "cost"

    def __init__(
        self,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(rng, clock)
        #: Prefill sent to each replica and probably not computed yet (request_cost's ``Q``).
        self.backlog = PrefillBacklog()

    def pick(self, replicas: Sequence[ReplicaState], request: RequestInfo) -> ReplicaState:
        _require(replicas)
        now = self._clock()
        default, typical = fleet_defaults(replicas)
        prefix = request.prefix
        blocks, tokens = request.blocks, request.prompt_tokens
        cached = [cached_prefix_tokens(r, prefix, blocks, tokens) for r in replicas]
        speeds = [replica_speed(r.speed, default) for r in replicas]
        held = max(cached)
        costs = [
            request_cost(
                r,
                request,
                sp,
                typical,
                now,
                cached=k,
                held_elsewhere=held,
                backlog=self.backlog.follow(
                    r.url,
                    now,
                    r.prompt_sent,
                    r.speed.prefill_s_per_token,
                    peer_sent=r.peer_prompt_sent,
                    peer_at=r.peer_prompt_at,
                ),
            )
            for r, sp, k in zip(replicas, speeds, cached, strict=True)
        ]
        best = min(costs)
        margin = COST_TIE * max(best, 1e-12)
        if not prefix:
            chosen = lowest(replicas, costs, margin, self._rng)
        else:
            tied = [r for r, c in zip(replicas, costs, strict=True) if c - best <= margin]
            chosen = tied[0] if len(tied) == 1 else home(tied, prefix)
        i = next(j for j, r in enumerate(replicas) if r is chosen)
        computed = round(max(0.0, tokens - cached[i]) * chosen.prefixes.token_scale)
        self.backlog.send(chosen.url, now, computed, chosen.speed.prefill_s_per_token)
        chosen.prompt_sent += computed  # what the other workers' backlogs follow
        return chosen


#: Policy name -> factory(rng).
POLICIES: dict[str, Callable[[random.Random | None], Policy]] = {
    LeastBusy.name: lambda rng: LeastBusy(rng),
    CostAware.name: lambda rng: CostAware(rng),
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
