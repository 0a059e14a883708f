"""A continuous-batching model of the vLLM scheduler, with time passed in (no clock, no I/O).

Why a model and not sleeps per request: the router must be tested against the thing that makes
vLLM interesting to balance, namely that every running request slows every other one down and
that a full batch makes new requests queue. One engine step here is one vLLM scheduler iteration:

1. admit waiting requests in FIFO order while fewer than `max_num_seqs` run;
2. the step lasts ``(step_ms * (1 + batch_slowdown * running)
   + prefill_ms_per_token * prompt tokens admitted this step) / speed`` milliseconds;
3. at the end of the step every request still running receives exactly one token (a request
   admitted this step gets its first token, as vLLM's prefill step also samples one);
4. a request finishes, with reason "length", when it holds `max_tokens` tokens.

The caller drives it: ``plan = begin_step(now, speed)``, wait ``plan.duration``,
``end_step(now)``. Requests aborted between the two calls get no token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.sim.config import SimConfig


@dataclass
class Sequence:
    """One request inside the engine, with the timestamps the latency metrics are made of."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    arrived_at: float
    generated: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None

    @property
    def kv_tokens(self) -> int:
        """Tokens this sequence keeps in the KV cache while it runs."""
        return self.prompt_tokens + self.generated


@dataclass(frozen=True)
class TokenEvent:
    """`seq` received token number `index` (0-based) at `at`; `finished` on its last one."""

    seq: Sequence
    index: int
    at: float
    finished: bool
    #: Time since the previous token of this sequence (None for the first token).
    inter_token: float | None


@dataclass(frozen=True)
class StepPlan:
    """What `begin_step` decided: how long the step lasts and whom it admitted."""

    started_at: float
    duration: float
    batch_size: int
    admitted: tuple[Sequence, ...]

    @property
    def prefill_tokens(self) -> int:
        return sum(seq.prompt_tokens for seq in self.admitted)


@dataclass
class EngineStats:
    """Lifetime counters, served as JSON by `GET /sim/stats`.

    Invariant: received == finished + aborted + failed + running + waiting. `failed` counts
    requests answered 500 by `fail_rate` (embeddings included); only completions and chat
    requests enter the engine.
    """

    received: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    steps: int = 0
    max_running_seen: int = 0


@dataclass(frozen=True)
class StepTiming:
    """The parameters of the step-time formula (see the module docstring)."""

    step_ms: float
    batch_slowdown: float
    prefill_ms_per_token: float

    def duration(self, batch_size: int, prefill_tokens: int, speed: float) -> float:
        """Seconds one step takes for `batch_size` running requests."""
        decode_ms = self.step_ms * (1.0 + self.batch_slowdown * batch_size)
        prefill_ms = self.prefill_ms_per_token * prefill_tokens
        return (decode_ms + prefill_ms) / speed / 1000.0


@dataclass
class SimEngine:
    """The scheduler state. Not thread-safe and never awaits: one asyncio loop drives it."""

    max_num_seqs: int
    timing: StepTiming
    kv_cache_tokens: int
    stats: EngineStats = field(default_factory=EngineStats)
    #: Dicts keep insertion order (FIFO) and remove an aborted request in O(1).
    waiting: dict[str, Sequence] = field(default_factory=dict)
    running: dict[str, Sequence] = field(default_factory=dict)
    _step: StepPlan | None = None

    @classmethod
    def from_config(cls, config: SimConfig) -> SimEngine:
        return cls(
            max_num_seqs=config.max_num_seqs,
            timing=StepTiming(
                step_ms=config.step_ms,
                batch_slowdown=config.batch_slowdown,
                prefill_ms_per_token=config.prefill_ms_per_token,
            ),
            kv_cache_tokens=config.kv_cache_tokens,
        )

    def add(self, request_id: str, prompt_tokens: int, max_tokens: int, now: float) -> Sequence:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if request_id in self.waiting or request_id in self.running:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        seq = Sequence(request_id, prompt_tokens, max_tokens, arrived_at=now)
        self.waiting[request_id] = seq
        self.stats.received += 1
        return seq

    def record_failed(self) -> None:
        """Count a request answered with an error before it reached the scheduler."""
        self.stats.received += 1
        self.stats.failed += 1

    def abort(self, request_id: str, now: float) -> Sequence | None:
        """Drop a request at once (client went away); None if it already finished."""
        seq = self.running.pop(request_id, None) or self.waiting.pop(request_id, None)
        if seq is None:
            return None
        seq.finished_at = now
        seq.finish_reason = "abort"
        self.stats.aborted += 1
        return seq

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def begin_step(self, now: float, speed: float = 1.0) -> StepPlan:
        """Admit waiting requests and decide how long this step takes."""
        if self._step is not None:
            raise RuntimeError("begin_step called twice without end_step")
        admitted: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            request_id = next(iter(self.waiting))
            seq = self.waiting.pop(request_id)
            seq.admitted_at = now
            self.running[request_id] = seq
            admitted.append(seq)
        self.stats.prompt_tokens += sum(seq.prompt_tokens for seq in admitted)
        batch_size = len(self.running)
        self.stats.max_running_seen = max(self.stats.max_running_seen, batch_size)
        prefill = sum(seq.prompt_tokens for seq in admitted)
        plan = StepPlan(
            started_at=now,
            duration=self.timing.duration(batch_size, prefill, speed),
            batch_size=batch_size,
            admitted=tuple(admitted),
        )
        self._step = plan
        return plan

    def end_step(self, now: float) -> list[TokenEvent]:
        """Give one token to every running request; retire those that reached max_tokens."""
        if self._step is None:
            raise RuntimeError("end_step called without begin_step")
        self._step = None
        self.stats.steps += 1
        events: list[TokenEvent] = []
        done: list[str] = []
        for request_id, seq in self.running.items():
            index = seq.generated
            seq.generated += 1
            inter_token = None if seq.last_token_at is None else now - seq.last_token_at
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.last_token_at = now
            finished = seq.generated >= seq.max_tokens
            if finished:
                seq.finished_at = now
                seq.finish_reason = "length"
                done.append(request_id)
            events.append(TokenEvent(seq, index, now, finished, inter_token))
        for request_id in done:
            del self.running[request_id]
        self.stats.tokens_generated += len(events)
        self.stats.finished += len(done)
        return events

    def kv_cache_usage(self) -> float:
        """Fraction of the KV cache held by running requests, capped at 1 like vLLM's gauge."""
        used = sum(seq.kv_tokens for seq in self.running.values())
        return min(1.0, used / self.kv_cache_tokens)
