"""How fast each replica generates, learned from its own /metrics counters (never configured).

The cost policy (vllm_fleet.router.balancer.CostAware) needs, per replica, the time of one decode
step as a function of the batch size, ``step_s(n) = token_s * (1 + batch_slowdown * n)``, the
batch size beyond which requests queue, and how long requests are. vLLM exports everything
needed as cumulative counters; each scrape hands them to ``SpeedEstimate.observe`` and the
difference to the previous scrape is one observation of the last interval:

- ``vllm:inter_token_latency_seconds`` sum / count: the mean time between two tokens of a
  request, i.e. the mean step time the running requests saw (older vLLM:
  ``vllm:time_per_output_token_seconds``, same meaning);
- ``vllm:generation_tokens_total`` / ``vllm:iteration_tokens_total`` count: tokens per engine
  step, i.e. the mean batch size during the interval (every running request gets one token per
  step); without the iteration histogram, the mean of the ``vllm:num_requests_running`` gauge
  at both ends. Without the latency histogram, the step time is estimated as
  batch * seconds / tokens over intervals where the replica ran requests throughout;
- ``vllm:request_success_total``: finished requests, so generated tokens per finished request
  (the learned size of a request that gives no ``max_tokens``);
- ``vllm:request_prefill_time_seconds`` sum and ``vllm:request_prompt_tokens`` sum minus
  ``vllm:prefix_cache_hits_total`` (tokens found cached are not computed): prefill seconds per
  computed prompt token (one step time per request subtracted: the first token's step);
- the batch limit (max_num_seqs, or fewer when the KV cache is the limit): the running count
  when requests are waiting *and* ``vllm:request_queue_time_seconds`` shows that requests
  really waited for a slot (over QUEUE_EVIDENCE_STEPS step times in the interval beyond one
  step each and beyond the interval's prefill seconds). A request waits up to one step for the
  scheduler even on an idle engine, so a waiting count alone is no proof; and a step computes
  at most max_num_batched_tokens, so a request sent while long prompts are prefilled waits for
  them with slots free. Counted as slot evidence, those waits taught the router limits of 2 to
  4 on replicas that run 16 (scenario 8: 1,650-token prompts, a 2,048-token step budget), and
  the cost policy then priced a queue that never came: it sent requests away from the replica
  that held their prefix (hit rate 85-89 % of the best possible; 98-99 % with the right limit).
  Without the queue-time histogram: waiting in two consecutive scrapes at the same running
  count.

Two time scales, because the two unknowns change differently. ``token_s`` is what a noisy
neighbour, a throttled GPU or a smaller replica changes, so it follows the data with a
FAST_HALF_LIFE_S = 2 s exponential average: after a replica halves its speed the estimate has
moved 3/4 of the way within ~4 s of scrapes (tested), well inside the 10 s the router must
react in. ``batch_slowdown`` is a property of the model and hardware, so it is a slow
(SLOW_HALF_LIFE_S = 60 s) weighted least-squares fit of step time against batch size, pulled
toward B_PRIOR while the batch size has not varied enough to tell. An observation the current
speed does not explain (off by over SHAPE_GATE) means the speed moved: the fit drops its
points and starts again, or it would read the move as batch slowdown (it did: a replica that
halved its speed with a full batch "learned" b = 0.2, and its speed estimate took 10 s
instead of 4 to follow).

Everything here is pure: time comes in with the sample, so tests drive it with synthetic
counter series.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

#: Half-life (s) of the decode-speed average: short, so a slowdown is noticed within seconds.
FAST_HALF_LIFE_S = 2.0
#: Half-life (s) of the batch-slowdown fit and of the tokens-per-request average.
SLOW_HALF_LIFE_S = 60.0
#: Relative step-time growth per running request assumed before the data say otherwise (GPU
#: decode is memory-bound: a bigger batch costs little more per step). Learned per replica.
B_PRIOR = 0.02
#: Weight of B_PRIOR in the fit, in units of the batch-size variance of the data: once the
#: observed batch sizes vary by more than ~1 request (std), the data dominate.
PRIOR_STRENGTH = 1.0
#: Bounds on the learned batch slowdown (a fit on noisy data must not go negative or explode).
B_MIN = 0.005
B_MAX = 0.5
#: Observations (weighted) the shape fit needs before it replaces the slowdown it has.
MIN_FIT_WEIGHT = 5.0
#: An observation more than this far (relative) from what the current speed predicts is a
#: speed change, and is kept out of the batch-slowdown fit.
SHAPE_GATE = 0.3
#: An interval with this many inter-token observations counts fully; fewer count less.
FULL_WEIGHT_TOKENS = 16.0
#: Queue time (in step times, beyond one step per queued request) that proves the batch was
#: full during an interval.
QUEUE_EVIDENCE_STEPS = 3.0


@dataclass(frozen=True)
class CounterSample:
    """One scrape's engine counters and gauges; None where the replica does not export one."""

    #: monotonic time of the scrape (seconds).
    at: float
    running: float
    waiting: float
    generation_tokens: float | None = None
    itl_sum: float | None = None
    itl_count: float | None = None
    #: engine steps (vllm:iteration_tokens_total histogram count).
    steps: float | None = None
    #: finished requests (vllm:request_success_total over all finish reasons).
    finished: float | None = None
    #: sum of per-request prefill seconds and of prompt tokens, over finished requests.
    prefill_s: float | None = None
    prefill_prompt_tokens: float | None = None
    prefill_requests: float | None = None
    #: sum and count of the vllm:request_queue_time_seconds histogram.
    queue_s: float | None = None
    queued: float | None = None
    #: prompt tokens found in the prefix cache (vllm:prefix_cache_hits_total): not prefilled.
    cached_tokens: float | None = None


#: The cumulative fields of CounterSample (the rest are the time and the gauges).
_COUNTERS = tuple(
    f.name for f in fields(CounterSample) if f.name not in ("at", "running", "waiting")
)


@dataclass(frozen=True)
class Interval:
    """Counter increases between two scrapes (None where either scrape lacked the counter)."""

    dt: float
    generation_tokens: float | None = None
    itl_sum: float | None = None
    itl_count: float | None = None
    steps: float | None = None
    finished: float | None = None
    prefill_s: float | None = None
    prefill_prompt_tokens: float | None = None
    prefill_requests: float | None = None
    queue_s: float | None = None
    queued: float | None = None
    cached_tokens: float | None = None

    @classmethod
    def between(cls, last: CounterSample, sample: CounterSample) -> Interval | None:
        """The increases from ``last`` to ``sample``; None if any counter went backwards."""
        changes: dict[str, float | None] = {}
        for name in _COUNTERS:
            new, old = getattr(sample, name), getattr(last, name)
            change = None if new is None or old is None else new - old
            if change is not None and change < 0:
                return None
            changes[name] = change
        return cls(dt=sample.at - last.at, **changes)


def _decay(dt: float, half_life: float) -> float:
    return math.exp(-math.log(2.0) * max(0.0, dt) / half_life)


@dataclass
class SpeedEstimate:
    """What one replica's counters say about its speed so far. Updated by ``observe``."""

    #: Seconds per decode step with an empty batch (``a`` in ``a * (1 + b * n)``); None until
    #: the replica has generated tokens while scraped.
    token_s: float | None = None
    #: Relative step-time growth per running request (``b``).
    batch_slowdown: float = B_PRIOR
    #: Running count at which the replica queues new requests (max_num_seqs or KV-limited);
    #: None until a full batch was seen.
    batch_limit: float | None = None
    #: Highest running count any scrape saw (a lower bound on the batch limit).
    peak_running: float = 0.0
    #: Prefill seconds per computed prompt token (0 until the replica exports prefill times;
    #: the cost policy then assumes PREFILL_STEP_PRIOR decode steps per token).
    prefill_s_per_token: float = 0.0
    #: Observations that updated ``token_s``.
    observations: int = 0
    #: Generated tokens and finished requests, exponentially forgotten (SLOW_HALF_LIFE_S): their
    #: ratio is the mean request length; the cost policy pools them over replicas.
    recent_tokens: float = 0.0
    recent_finished: float = 0.0
    #: Exponentially forgotten sums for the slow fits: weights, n, n^2, y, n*y of the shape
    #: fit; prefill seconds, prompt tokens.
    _fit: list[float] = field(default_factory=lambda: [0.0] * 5, repr=False)
    _prefill: list[float] = field(default_factory=lambda: [0.0, 0.0], repr=False)
    _last: CounterSample | None = field(default=None, repr=False)

    def step_s(self, batch: float) -> float | None:
        """Seconds per decode step with ``batch`` requests running; None when not learned."""
        if self.token_s is None:
            return None
        return self.token_s * (1.0 + self.batch_slowdown * max(0.0, batch))

    @property
    def tokens_per_request(self) -> float | None:
        """Mean generated tokens per finished request (recent), None before any finished."""
        return self.recent_tokens / self.recent_finished if self.recent_finished > 0.5 else None

    def reset(self) -> None:
        """Forget everything (the replica restarted: its counters went back to zero)."""
        fresh = SpeedEstimate()
        self.__dict__.update(fresh.__dict__)

    def observe(self, sample: CounterSample) -> None:
        """Fold one scrape in: the interval since the previous scrape is one observation."""
        last, self._last = self._last, sample
        if last is None or sample.at <= last.at:
            return
        change = Interval.between(last, sample)
        if change is None:
            self.reset()  # counters went backwards: a restarted engine, maybe a different one
            self._last = sample
            return
        self._learn_batch_limit(last, sample, change)
        observed = self._step_observation(last, sample, change)
        if observed is not None:
            batch, step, weight = observed
            self._learn_speed(batch, step, weight, change.dt)
        self._learn_sizes(change)

    # -- the parts of one observation ------------------------------------------------------

    def _learn_batch_limit(
        self, last: CounterSample, sample: CounterSample, change: Interval
    ) -> None:
        running = sample.running
        self.peak_running = max(self.peak_running, running)
        step = self.step_s(running)
        if change.queue_s is not None and change.queued is not None:
            # Beyond the scheduler's step, and beyond the prefill the engine did meanwhile: a
            # step computes at most max_num_batched_tokens, so a request sent while long
            # prompts are prefilled waits for them with free slots (see the module docstring).
            prefilled = change.prefill_s or 0.0
            waited = change.queue_s - change.queued * (step or 0.0) - prefilled
            full = step is not None and waited > QUEUE_EVIDENCE_STEPS * step
        else:
            full = last.waiting > 0 and running == last.running
        if full and sample.waiting > 0 and running >= 1:
            self.batch_limit = max(self.batch_limit or 0.0, running)
        elif self.batch_limit is not None and running > self.batch_limit:
            self.batch_limit = running  # it ran more than we thought it could

    @staticmethod
    def _step_observation(
        last: CounterSample, sample: CounterSample, change: Interval
    ) -> tuple[float, float, float] | None:
        """(mean batch size, mean step seconds, weight in [0, 1]) of the interval, or None."""
        tokens, itl_count, itl_sum = change.generation_tokens, change.itl_count, change.itl_sum
        steps = change.steps
        gauge_batch = (last.running + sample.running) / 2.0
        if itl_count is not None and itl_sum is not None:
            if itl_count < 1 or itl_sum <= 0:
                return None  # idle interval: nothing learned, old estimate kept
            if steps is not None and steps > 0 and tokens is not None and tokens > 0:
                batch = tokens / steps
            else:
                batch = gauge_batch
            return batch, itl_sum / itl_count, min(1.0, itl_count / FULL_WEIGHT_TOKENS)
        # No latency histogram: busy the whole interval, so step time = batch * dt / tokens.
        if tokens is None or tokens < 1 or last.running < 1 or sample.running < 1:
            return None
        return gauge_batch, gauge_batch * change.dt / tokens, min(1.0, tokens / FULL_WEIGHT_TOKENS)

    def _learn_speed(self, batch: float, step: float, weight: float, dt: float) -> None:
        if self.token_s is None:
            self.token_s = step / (1.0 + self.batch_slowdown * batch)
            self.observations += 1
            return
        # The slow fit of the shape only takes observations the current speed explains; one it
        # does not means the speed itself moved, and older points (at the old speed) would
        # read the move as batch slowdown: they are dropped and the fit starts again.
        predicted = self.token_s * (1.0 + self.batch_slowdown * batch)
        if abs(step / predicted - 1.0) <= SHAPE_GATE:
            self._fit_shape(batch, step, weight, dt)
        else:
            self._fit = [0.0] * 5
        # Fast average of the empty-batch step time, given the current slowdown.
        empty = step / (1.0 + self.batch_slowdown * batch)
        rate = weight * (1.0 - _decay(dt, FAST_HALF_LIFE_S))
        self.token_s += rate * (empty - self.token_s)
        self.observations += 1

    def _fit_shape(self, batch: float, step: float, weight: float, dt: float) -> None:
        """Weighted least squares of step = alpha + beta * batch; b = beta / alpha."""
        keep = _decay(dt, SLOW_HALF_LIFE_S)
        fit = [v * keep for v in self._fit]
        for i, v in enumerate((1.0, batch, batch * batch, step, batch * step)):
            fit[i] += weight * v
        self._fit = fit
        sw, sn, snn, sy, sny = fit
        if sw < MIN_FIT_WEIGHT:
            return
        lam = PRIOR_STRENGTH * sw
        # Normal equations of sum w (y - alpha - beta n)^2 + lam (beta - B_PRIOR alpha)^2.
        m11, m12, m22 = sw + lam * B_PRIOR**2, sn - lam * B_PRIOR, snn + lam
        det = m11 * m22 - m12 * m12
        if det <= 1e-12:
            return
        alpha = (sy * m22 - m12 * sny) / det
        beta = (m11 * sny - m12 * sy) / det
        if alpha > 0:
            self.batch_slowdown = min(B_MAX, max(B_MIN, beta / alpha))

    def _learn_sizes(self, change: Interval) -> None:
        keep = _decay(change.dt, SLOW_HALF_LIFE_S)
        if change.generation_tokens is not None and change.finished is not None:
            self.recent_tokens = self.recent_tokens * keep + change.generation_tokens
            self.recent_finished = self.recent_finished * keep + change.finished
        prompt_tokens = change.prefill_prompt_tokens
        if prompt_tokens is not None and change.cached_tokens is not None:
            # Cached prompt tokens take no prefill time: only the computed ones are priced.
            prompt_tokens -= min(prompt_tokens, change.cached_tokens)
        if change.prefill_s is None or prompt_tokens is None or not prompt_tokens > 0:
            return
        # Each request's prefill time includes its first step; that is decode, not prefill.
        first_steps = (change.prefill_requests or 0.0) * (self.step_s(1.0) or 0.0)
        excess = max(0.0, change.prefill_s - first_steps)
        self._prefill = [self._prefill[0] * keep + excess, self._prefill[1] * keep + prompt_tokens]
        if self._prefill[1] > 0:
            self.prefill_s_per_token = self._prefill[0] / self._prefill[1]
