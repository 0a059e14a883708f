"""A model of vLLM V1's scheduler and KV cache, with time passed in (no clock, no I/O).

Why a model and not sleeps per request: the router must be tested against what makes vLLM
interesting to balance: every running request slows the others down, long contexts slow
decoding, a full batch or a full KV cache makes new requests queue, and a prompt whose leading
blocks a replica still caches costs that replica almost nothing to prefill. The model is vLLM
V1's, not the router's: the balancer fits ``step = a * (1 + b * n)``, which this law is not.

One engine step is one scheduler iteration, as in vLLM V1 (vllm/v1/core/sched/scheduler.py):

1. running requests first, in admission order: each asks for the tokens it still has to
   compute (1 when decoding, the rest of its prompt when prefilling), capped by what is left of
   the step's token budget (`max_num_batched_tokens`: chunked prefill). If the KV blocks for
   them cannot be allocated, a running request is preempted (blocks freed, recomputed later
   from its prompt and tokens so far, put back in the queue), until they can or the request
   itself was the one preempted;
2. then, unless something was preempted, waiting requests while fewer than `max_num_seqs` run
   and budget is left (order and victims: --scheduling-policy, `launcher.sim.scheduling`): the
   longest run of leading prompt blocks in the prefix cache is taken as computed (never the
   whole prompt: the last token is always computed), the rest scheduled like above (chunked);
3. the step lasts (`StepTiming`)::

       (step_ms + per_seq_ms * requests + per_token_ms * tokens
        + attention_ms * kv_read / 1000 + prefill_attention_ms * pairs / 1e6) / speed

   where `tokens` is every token computed this step (decode and prefill), `kv_read` the KV
   tokens the decodes read (each its context length: what makes a batch of long conversations
   slower than a batch of short ones of the same size), and `pairs` the prefill attention work
   (a chunk of c tokens after p cached or computed ones: c * p + c * (c + 1) / 2 query-key
   pairs; quadratic in a cold prompt, and what a cached prefix still costs its new tokens).
   Both kinds of attention are measured on vLLM (docs/simulator.md): a decode's KV read costs
   about ten times a prefill's query-key pair;
4. at the end of the step every request whose computed tokens caught up with its prompt and
   output gets one token (a prefill that completed samples its first one; a partial chunk gets
   none); a request finishes, with reason "length", at `max_tokens` tokens and frees its
   blocks (cached ones stay in the prefix cache until evicted,
       `vllm_fleet.launcher.sim.kvcache`). Full
   blocks are cached as they are computed, output blocks too, as in vLLM.

The caller drives it: ``plan = begin_step(now, speed)``, wait ``plan.duration``,
``end_step(now)``. Requests aborted between the two calls get no token.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from vllm_fleet.launcher.sim.config import SimConfig
from vllm_fleet.launcher.sim.kvcache import BlockPool
from vllm_fleet.launcher.sim.scheduling import FCFS, next_waiting, preemption_victim
from vllm_fleet.launcher.sim.tokens import extend_block_hashes, output_token_id


@dataclass
class Sequence:
    """One request inside the engine, with the timestamps the latency metrics are made of."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    arrived_at: float
    #: Prompt ids, then each generated token's id as it is sampled (None: a prompt that shares
    #: nothing with any other, or prefix caching off).
    token_ids: list[int] | None = field(default=None, repr=False)
    #: Picks the generated words (and so their ids), as
    #: `vllm_fleet.launcher.sim.tokens.output_token_id`.
    text_offset: int = 0
    #: vLLM's request priority (smaller first under `scheduling_policy` "priority").
    priority: int = 0
    generated: int = 0
    #: Tokens whose KV the engine holds (prefix hits included).
    computed: int = 0
    #: Prompt tokens the prefix cache supplied at the last admission.
    cached_tokens: int = 0
    preemptions: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    blocks: list[int] = field(default_factory=list, repr=False)
    #: Chained hashes of the full blocks of `token_ids`, extended as blocks fill.
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    #: Leading blocks already registered in the prefix cache (or found there).
    registered_blocks: int = 0

    @property
    def kv_tokens(self) -> int:
        """Tokens this sequence keeps in the KV cache while it runs."""
        return self.computed

    @property
    def total_tokens(self) -> int:
        """Prompt plus output so far: what must be computed before the next token."""
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
    """What `begin_step` decided: how long the step lasts, whom it runs and how much."""

    started_at: float
    duration: float
    #: Requests holding a running slot after scheduling.
    batch_size: int
    #: Requests taken from the queue this step (new or resumed after a preemption).
    admitted: tuple[Sequence, ...]
    #: (request, tokens computed for it this step), in scheduling order.
    scheduled: tuple[tuple[Sequence, int], ...] = ()
    #: Requests preempted this step (blocks freed, back at the head of the queue).
    preempted: tuple[Sequence, ...] = ()
    #: Prefix-cache lookups of this step's admissions: prompt tokens asked for, and found.
    cache_queries: int = 0
    cache_hits: int = 0
    #: KV tokens the step's decodes read (each its context, computed + new tokens).
    kv_read: int = 0
    #: Query-key pairs of the step's prefill chunks (`prefill_attention_pairs`).
    prefill_pairs: int = 0
    #: Tokens computed for requests that were not decoding (prompt chunks, recomputation).
    prefill_tokens: int = 0

    @property
    def computed_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


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
    #: Prompt tokens computed (prefix-cache hits are not).
    prompt_tokens: int = 0
    steps: int = 0
    max_running_seen: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0


@dataclass(frozen=True)
class StepTiming:
    """The step-time law (module docstring, point 3); the constants are in docs/simulator.md.

    `batch_slowdown` is the per-request cost as a fraction of `step_ms`, so `--step-ms` and
    `--batch-slowdown` keep their old meaning for short decodes; `prefill_ms_per_token` is
    charged for every computed token (a decode token goes through the same layers), and
    `attention_ms_per_ktoken` per thousand KV tokens read.
    """

    step_ms: float
    batch_slowdown: float
    prefill_ms_per_token: float
    attention_ms_per_ktoken: float = 0.0
    prefill_attention_ms_per_mpair: float = 0.0

    @classmethod
    def from_config(cls, config: SimConfig) -> StepTiming:
        """The law a simulator started with `config` runs (derived defaults filled in)."""
        return cls(
            step_ms=config.step_ms,
            batch_slowdown=config.batch_slowdown,
            prefill_ms_per_token=config.effective_prefill_ms_per_token,
            attention_ms_per_ktoken=config.effective_attention_ms_per_ktoken,
            prefill_attention_ms_per_mpair=config.effective_prefill_attention_ms_per_mpair,
        )

    def duration(
        self, batch_size: int, prefill_tokens: int, speed: float, kv_read: int = 0
    ) -> float:
        """Seconds one step takes: `batch_size` requests computing `batch_size` decode tokens
        plus `prefill_tokens` prompt tokens, reading `kv_read` KV tokens in all."""
        return self.step_duration(batch_size, batch_size + prefill_tokens, kv_read, speed)

    def step_duration(
        self, requests: int, tokens: int, kv_read: int, speed: float, prefill_pairs: int = 0
    ) -> float:
        """Seconds of a step computing `tokens` tokens for `requests` requests."""
        ms = (
            self.step_ms * (1.0 + self.batch_slowdown * requests)
            + self.prefill_ms_per_token * tokens
            + self.attention_ms_per_ktoken * kv_read / 1000.0
            + self.prefill_attention_ms_per_mpair * prefill_pairs / 1e6
        )
        return ms / speed / 1000.0


def prefill_attention_pairs(computed: int, tokens: int) -> int:
    """Query-key pairs of `tokens` new tokens after `computed` ones (causal attention)."""
    return tokens * computed + tokens * (tokens + 1) // 2


def kv_read_tokens(computed: int, tokens: int) -> int:
    """KV tokens a request reads when it computes `tokens` new ones after `computed` ones."""
    return computed + tokens


def _decoding(seq: Sequence) -> bool:
    """Whether `seq` computes just its last sampled token (as opposed to a prompt chunk)."""
    return seq.generated > 0 and seq.computed == seq.total_tokens - 1


@dataclass
class SimEngine:
    """The scheduler state. Not thread-safe and never awaits: one asyncio loop drives it."""

    max_num_seqs: int
    timing: StepTiming
    kv_cache_tokens: int
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    record_kv_events: bool = False
    #: vLLM's --scheduling-policy: "fcfs" or "priority" (`vllm_fleet.launcher.sim.scheduling`).
    scheduling_policy: str = FCFS
    stats: EngineStats = field(default_factory=EngineStats)
    #: Dicts keep insertion order (FIFO) and remove an aborted request in O(1).
    waiting: dict[str, Sequence] = field(default_factory=dict)
    running: dict[str, Sequence] = field(default_factory=dict)
    pool: BlockPool = field(init=False)
    _step: StepPlan | None = None

    def __post_init__(self) -> None:
        self.pool = BlockPool(
            num_blocks=max(1, self.kv_cache_tokens // self.block_size),
            block_size=self.block_size,
            record_events=self.record_kv_events,
        )

    @classmethod
    def from_config(cls, config: SimConfig) -> SimEngine:
        return cls(
            max_num_seqs=config.max_num_seqs,
            timing=StepTiming.from_config(config),
            kv_cache_tokens=config.kv_cache_tokens,
            block_size=config.block_size,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
            record_kv_events=config.kv_events is not None,
            scheduling_policy=config.scheduling_policy,
        )

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def add(
        self,
        request_id: str,
        prompt_tokens: int,
        max_tokens: int,
        now: float,
        prompt_token_ids: Seq[int] | None = None,
        text_offset: int = 0,
        priority: int = 0,
    ) -> Sequence:
        """Queue a request. With `prompt_token_ids` its blocks (prompt, then output) take part
        in prefix caching; `text_offset` picks its output words
        (`vllm_fleet.launcher.sim.tokens`)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if prompt_tokens < 1:
            raise ValueError(f"a prompt needs at least 1 token, got {prompt_tokens}")
        if prompt_token_ids is not None and len(prompt_token_ids) != prompt_tokens:
            raise ValueError("prompt_tokens must equal the number of prompt_token_ids")
        if request_id in self.waiting or request_id in self.running:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if self.pool.blocks_for(prompt_tokens + max_tokens) > self.pool.num_blocks:
            raise ValueError(
                f"{prompt_tokens + max_tokens} tokens do not fit the KV cache "
                f"({self.pool.num_blocks * self.block_size} tokens)"
            )
        seq = Sequence(request_id, prompt_tokens, max_tokens, arrived_at=now, priority=priority)
        seq.text_offset = text_offset
        if prompt_token_ids is not None and self.enable_prefix_caching:
            seq.token_ids = list(prompt_token_ids)
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
        self._release(seq)
        seq.finished_at = now
        seq.finish_reason = "abort"
        self.stats.aborted += 1
        return seq

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def reset_prefix_cache(self) -> bool:
        """vLLM's reset_prefix_cache: forget every cached block; refused while requests run."""
        if self.running:
            return False
        return self.pool.reset()

    def _release(self, seq: Sequence) -> None:
        self.pool.free(seq.blocks)
        seq.blocks = []
        seq.computed = 0
        seq.registered_blocks = 0

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Allocate the blocks `seq` needs to hold `tokens` tokens; False if none are left."""
        missing = self.pool.blocks_for(tokens) - len(seq.blocks)
        if missing <= 0:
            return True
        if not self.pool.can_take((), missing):
            return False
        seq.blocks += self.pool.take((), missing)
        return True

    def _hashes(self, seq: Sequence, blocks: int) -> list[bytes]:
        """`seq`'s block hashes, extended to `blocks` full blocks where its ids allow."""
        if seq.token_ids is not None:
            extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, blocks)
        return seq.block_hashes

    def _register(self, seq: Sequence, tokens: int) -> None:
        """Put the blocks that `tokens` computed tokens fill into the prefix cache."""
        if seq.token_ids is None:
            return
        full = min(tokens // self.block_size, len(self._hashes(seq, tokens // self.block_size)))
        if full > seq.registered_blocks:
            self.pool.register(
                seq.blocks, seq.block_hashes, seq.token_ids, seq.registered_blocks, full
            )
            seq.registered_blocks = full

    def _preempt(self, seq: Sequence) -> None:
        del self.running[seq.request_id]
        self._release(seq)
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.waiting = {seq.request_id: seq, **self.waiting}

    def _schedule_running(
        self, budget: int, scheduled: list[tuple[Sequence, int]], preempted: list[Sequence]
    ) -> int:
        for seq in list(self.running.values()):
            if budget <= 0:
                break
            if seq.request_id not in self.running:
                continue  # preempted for an earlier request of this step
            tokens = min(seq.total_tokens - seq.computed, budget)
            while not self._grow(seq, seq.computed + tokens):
                victim = preemption_victim(self.running, self.scheduling_policy)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.request_id not in self.running:
                break
            self._register(seq, seq.computed + tokens)
            scheduled.append((seq, tokens))
            budget -= tokens
        return budget

    def _admit(
        self, budget: int, now: float, scheduled: list[tuple[Sequence, int]]
    ) -> tuple[list[Sequence], int, int]:
        admitted: list[Sequence] = []
        queries = hits = 0
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = next_waiting(self.waiting, self.scheduling_policy)
            total = seq.total_tokens
            lookup = (total - 1) // self.block_size
            hit_blocks = self.pool.cached_prefix(self._hashes(seq, lookup), lookup)
            hit = len(hit_blocks) * self.block_size
            tokens = min(total - hit, budget)
            new_blocks = self.pool.blocks_for(hit + tokens) - len(hit_blocks)
            if not self.pool.can_take(hit_blocks, new_blocks):
                break
            del self.waiting[seq.request_id]
            seq.blocks = self.pool.take(hit_blocks, new_blocks)
            seq.computed = hit
            seq.registered_blocks = len(hit_blocks)
            seq.cached_tokens = hit
            if seq.preemptions == 0:  # vLLM counts a resumed request's lookup apart
                queries += total
                hits += hit
            if seq.admitted_at is None:
                seq.admitted_at = now
            self.running[seq.request_id] = seq
            self._register(seq, hit + tokens)
            scheduled.append((seq, tokens))
            admitted.append(seq)
            budget -= tokens
        return admitted, queries, hits

    def begin_step(self, now: float, speed: float = 1.0) -> StepPlan:
        """Schedule one step (running first, then the queue) and decide how long it takes."""
        if self._step is not None:
            raise RuntimeError("begin_step called twice without end_step")
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        budget = self._schedule_running(self.max_num_batched_tokens, scheduled, preempted)
        admitted: list[Sequence] = []
        queries = hits = 0
        if not preempted:
            admitted, queries, hits = self._admit(budget, now, scheduled)
        stats = self.stats
        stats.prefix_cache_queries += queries
        stats.prefix_cache_hits += hits
        batch_size = len(self.running)
        stats.max_running_seen = max(stats.max_running_seen, batch_size)
        kv_read = sum(kv_read_tokens(seq.computed, n) for seq, n in scheduled if _decoding(seq))
        pairs = sum(
            prefill_attention_pairs(seq.computed, n) for seq, n in scheduled if not _decoding(seq)
        )
        tokens = sum(n for _, n in scheduled)
        prefill = sum(n for seq, n in scheduled if not _decoding(seq))
        plan = StepPlan(
            started_at=now,
            duration=self.timing.step_duration(
                len(scheduled), tokens, kv_read, speed, prefill_pairs=pairs
            ),
            batch_size=batch_size,
            admitted=tuple(admitted),
            scheduled=tuple(scheduled),
            preempted=tuple(preempted),
            cache_queries=queries,
            cache_hits=hits,
            kv_read=kv_read,
            prefill_pairs=pairs,
            prefill_tokens=prefill,
        )
        stats.prompt_tokens += prefill
        self._step = plan
        return plan

    def end_step(self, now: float) -> list[TokenEvent]:
        """Advance every scheduled request; those that caught up get one token."""
        plan = self._step
        if plan is None:
            raise RuntimeError("end_step called without begin_step")
        self._step = None
        self.stats.steps += 1
        events: list[TokenEvent] = []
        for seq, tokens in plan.scheduled:
            if self.running.get(seq.request_id) is not seq:
                continue  # aborted during the step
            seq.computed += tokens
            if seq.computed < seq.total_tokens:
                continue  # a prefill chunk: no token yet
            index = seq.generated
            seq.generated += 1
            if seq.token_ids is not None:
                seq.token_ids.append(output_token_id(seq.text_offset, index))
            inter_token = None if seq.last_token_at is None else now - seq.last_token_at
            if seq.first_token_at is None:
                seq.first_token_at = now
            seq.last_token_at = now
            finished = seq.generated >= seq.max_tokens
            if finished:
                seq.finished_at = now
                seq.finish_reason = "length"
                del self.running[seq.request_id]
                self.pool.free(seq.blocks)
                seq.blocks = []
                self.stats.finished += 1
            events.append(TokenEvent(seq, index, now, finished, inter_token))
        self.stats.tokens_generated += len(events)
        return events

    def kv_cache_usage(self) -> float:
        """vLLM's gauge: the fraction of KV blocks held by requests (cached free ones are free)."""
        return self.pool.usage()
