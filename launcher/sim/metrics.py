"""The vLLM Prometheus metrics the router reads, under vLLM's names, labels and buckets.

Names, the `model_name`/`engine` labels and bucket bounds follow vLLM 0.32 (vllm/v1/metrics/
loggers.py and buckets.py) so a router that balances on a real fleet balances on this one. Each
app gets its own CollectorRegistry: several simulators live in one test process.

Prefix-cache counters count tokens, as vLLM's: `vllm:prefix_cache_queries_total` grows by the
prompt length of every newly scheduled request, `vllm:prefix_cache_hits_total` by the leading
tokens the cache supplied (a preempted request's second lookup is not counted, as in vLLM).
`vllm:kv_cache_usage_perc` is the fraction of KV blocks held by requests.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vllm_fleet.launcher.sim.engine import Sequence, SimEngine, StepPlan, TokenEvent

_LABELS = ("model_name", "engine")

REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

#: finished_reason label values vLLM pre-creates (FinishReason in vllm/v1/engine).
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


#: vLLM's 1-2-5 buckets for token counts (build_1_2_5_buckets), up to a long context.
PROMPT_TOKENS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class SimMetrics:
    """Owns one registry; the runner reports steps, tokens and finished requests to it."""

    def __init__(self, model_name: str, cache_config: Mapping[str, str] | None = None) -> None:
        """`cache_config`: labels of `vllm:cache_config_info` (block_size, num_gpu_blocks...)."""
        self.registry = CollectorRegistry(auto_describe=True)
        labels = (model_name, "0")
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, _LABELS, registry=reg)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, _LABELS, registry=reg)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, _LABELS, buckets=buckets, registry=reg)

        self.running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        ).labels(*labels)
        self.waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        ).labels(*labels)
        self.kv_cache_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        ).labels(*labels)
        self.prompt_tokens = counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed."
        ).labels(*labels)
        self.prompt_tokens_cached = counter(
            "vllm:prompt_tokens_cached",
            "Number of cached prompt tokens (local prefix cache plus external KV transfer).",
        ).labels(*labels)
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        ).labels(*labels)
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        ).labels(*labels)
        self.preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        ).labels(*labels)
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        ).labels(*labels)
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*_LABELS, "finished_reason"),
            registry=reg,
        )
        self.success = {reason: success.labels(*labels, reason) for reason in FINISH_REASONS}
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS,
        ).labels(*labels)
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TIME_TO_FIRST_TOKEN_BUCKETS,
        ).labels(*labels)
        self.inter_token = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            INTER_TOKEN_LATENCY_BUCKETS,
        ).labels(*labels)
        self.time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            INTER_TOKEN_LATENCY_BUCKETS,
        ).labels(*labels)
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(*labels)
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(*labels)
        self.prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(*labels)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            PROMPT_TOKENS_BUCKETS,
        ).labels(*labels)
        if cache_config is not None:
            info = Gauge(
                "vllm:cache_config_info",
                "Information of the LLMEngine CacheConfig",
                ("engine", *cache_config),
                registry=reg,
            )
            info.labels("0", *cache_config.values()).set(1)

    def record_step(self, plan: StepPlan, events: list[TokenEvent]) -> None:
        for seq in plan.admitted:
            if seq.admitted_at is not None and seq.preemptions == 0:
                self.queue_time.observe(seq.admitted_at - seq.arrived_at)
        self.prefix_cache_queries.inc(plan.cache_queries)
        self.prefix_cache_hits.inc(plan.cache_hits)
        self.preemptions.inc(len(plan.preempted))
        self.generation_tokens.inc(len(events))
        self.iteration_tokens.observe(plan.prefill_tokens + len(events))
        for event in events:
            seq = event.seq
            if event.inter_token is None:
                # vLLM counts a prompt once its prefill is done, cached tokens included.
                self.prompt_tokens.inc(seq.prompt_tokens)
                self.prompt_tokens_cached.inc(seq.cached_tokens)
                self.ttft.observe(event.at - seq.arrived_at)
                if seq.admitted_at is not None:
                    # Observed together, so their sums pair up (the router's prefill price).
                    self.prefill_time.observe(event.at - seq.admitted_at)
                    self.request_prompt_tokens.observe(seq.prompt_tokens)
            else:
                self.inter_token.observe(event.inter_token)
            if event.finished:
                self.record_finished(seq)

    def record_finished(self, seq: Sequence) -> None:
        """Count a request that left the engine (finished or aborted)."""
        self.success[seq.finish_reason or "length"].inc()
        if seq.finish_reason != "length" or seq.finished_at is None:
            return
        self.e2e.observe(seq.finished_at - seq.arrived_at)
        if seq.generated > 1 and seq.first_token_at is not None:
            decode = seq.finished_at - seq.first_token_at
            self.time_per_output_token.observe(decode / (seq.generated - 1))

    def render(self, engine: SimEngine) -> bytes:
        """Prometheus text exposition, gauges refreshed from the engine at scrape time."""
        self.running.set(len(engine.running))
        self.waiting.set(len(engine.waiting))
        self.kv_cache_usage.set(engine.kv_cache_usage())
        return generate_latest(self.registry)
