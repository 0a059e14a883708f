"""The router's Prometheus metrics, in a registry owned by one app (no global default registry).

Per-request series are ordinary counters and histograms updated by the proxy. Per-replica
state (in flight, healthy, engine gauges, ejections) already lives in the Fleet, so a custom
collector reads it at scrape time instead of mirroring every change into gauges: nothing to
keep in sync, and replicas removed by discovery disappear from the output.

Label values are bounded: ``replica`` is a known replica URL (or "none" when the router answered
itself), ``status`` an HTTP status code, ``reason`` one of a fixed set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vllm_fleet.router.prefix_index import memory_bytes
from vllm_fleet.router.state import Fleet

#: The replica label when no replica was involved (validation errors, 503 before a pick).
NO_REPLICA = "none"
#: The status recorded when the client went away first (nginx's convention).
CLIENT_CLOSED = 499
#: Failure reasons for retries and stream errors.
#: "stalled": the attempt waited on a replica found hung and was re-sent
#: (vllm_fleet.router.progress).
REASONS = ("connect", "timeout", "status", "disconnect", "stalled")
#: Why a cut stream was not continued (vllm_fleet.router.continuation): the request's parameters,
#: what was streamed, no replica could take the rest, or the stream broke too many times.
CONTINUATION_FAILURES = ("request", "stream", "replica", "limit")

#: LLM requests last from milliseconds (embeddings) to minutes (long generations).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class FleetCollector(Collector):
    """Per-replica gauges read from the Fleet when /metrics is scraped."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        labels = ["replica"]
        in_flight = GaugeMetricFamily(
            "vllm_fleet_replica_in_flight",
            "Requests this router has open on the replica",
            labels=labels,
        )
        healthy = GaugeMetricFamily(
            "vllm_fleet_replica_healthy", "1 when the replica takes traffic, else 0", labels=labels
        )
        waiting = GaugeMetricFamily(
            "vllm_fleet_replica_waiting", "Engine queue length from the last scrape", labels=labels
        )
        running = GaugeMetricFamily(
            "vllm_fleet_replica_running",
            "Engine running requests from the last scrape",
            labels=labels,
        )
        kv = GaugeMetricFamily(
            "vllm_fleet_replica_kv_cache_usage",
            "Engine KV-cache usage (0-1) from the last scrape",
            labels=labels,
        )
        served = CounterMetricFamily(
            "vllm_fleet_replica_served", "Requests finished on the replica", labels=labels
        )
        ejections = CounterMetricFamily(
            "vllm_fleet_ejections", "Times the circuit breaker ejected the replica", labels=labels
        )
        suspect = GaugeMetricFamily(
            "vllm_fleet_replica_suspect",
            "1 while the replica owes bytes and has sent none (a possible hang), else 0",
            labels=labels,
        )
        # What the router learned about each replica's speed (vllm_fleet.router.speed), absent
        # until learned: the numbers the cost policy prices requests with, for the dashboard.
        step = GaugeMetricFamily(
            "vllm_fleet_replica_step_seconds",
            "Learned seconds per decode step with an empty batch",
            labels=labels,
        )
        slowdown = GaugeMetricFamily(
            "vllm_fleet_replica_batch_slowdown",
            "Learned relative decode-step growth per running request",
            labels=labels,
        )
        prefill = GaugeMetricFamily(
            "vllm_fleet_replica_prefill_seconds_per_token",
            "Learned prefill seconds per computed prompt token (0 until learned)",
            labels=labels,
        )
        for r in list(self._fleet.replicas.values()):
            key = [r.url]
            if r.speed.token_s is not None:
                step.add_metric(key, r.speed.token_s)
                slowdown.add_metric(key, r.speed.batch_slowdown)
            prefill.add_metric(key, r.speed.prefill_s_per_token)
            in_flight.add_metric(key, r.in_flight)
            healthy.add_metric(key, 1.0 if r.healthy else 0.0)
            waiting.add_metric(key, r.waiting)
            running.add_metric(key, r.running)
            kv.add_metric(key, r.kv_cache_usage)
            served.add_metric(key, r.served)
            ejections.add_metric(key, r.ejections)
            suspect.add_metric(key, 1.0 if r.suspect else 0.0)
        yield from (in_flight, healthy, waiting, running, kv, served, ejections, suspect)
        yield from (step, slowdown, prefill)


class PrefixCollector(Collector):
    """The prefix index per replica (vllm_fleet.router.prefix_index): what the router predicted next
    to what the replica measured, how far it is trusted, its size; KV-event block counts where
    replicas publish them. Hit rates are recent (30 s half-life) and absent until known."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        labels = ["replica"]
        predicted = GaugeMetricFamily(
            "vllm_fleet_prefix_predicted_hit_rate",
            "Share of the prompt bytes sent to the replica that the router's index predicted "
            "cached there (recent)",
            labels=labels,
        )
        measured = GaugeMetricFamily(
            "vllm_fleet_prefix_measured_hit_rate",
            "The replica's own prefix-cache hit rate, vllm:prefix_cache_hits / queries (recent)",
            labels=labels,
        )
        trust = GaugeMetricFamily(
            "vllm_fleet_prefix_trust",
            "Measured / predicted hit rate (0.1-1): how much of a predicted cached prefix "
            "the cost believes",
            labels=labels,
        )
        keys = GaugeMetricFamily(
            "vllm_fleet_prefix_index_entries",
            "Prefix blocks the index holds for the replica",
            labels=labels,
        )
        resets = CounterMetricFamily(
            "vllm_fleet_prefix_index_resets",
            "Times the replica's prefix record was dropped (restart, cleared or forgotten cache)",
            labels=labels,
        )
        blocks = GaugeMetricFamily(
            "vllm_fleet_kv_event_blocks",
            "KV blocks the replica holds according to its vLLM KV events",
            labels=labels,
        )
        missed = CounterMetricFamily(
            "vllm_fleet_kv_event_batches_missed",
            "KV event batches the replica published that the router did not receive",
            labels=labels,
        )
        replayed = CounterMetricFamily(
            "vllm_fleet_kv_event_batches_replayed",
            "KV event batches the router read from the replica's replay socket",
            labels=labels,
        )
        records = []
        for r in list(self._fleet.replicas.values()):
            key, prefixes = [r.url], r.prefixes
            records.append(prefixes)
            if (rate := prefixes.predicted_hit_rate) is not None:
                predicted.add_metric(key, rate)
            if (rate := prefixes.measured_hit_rate) is not None:
                measured.add_metric(key, rate)
            trust.add_metric(key, prefixes.trust)
            keys.add_metric(key, len(prefixes))
            resets.add_metric(key, prefixes.resets)
            if (events := prefixes.events) is not None:
                blocks.add_metric(key, len(events.hashes))
                missed.add_metric(key, events.missed)
                replayed.add_metric(key, events.replayed)
        memory = GaugeMetricFamily(
            "vllm_fleet_prefix_index_bytes",
            "Approximate memory of the prefix index over all replicas",
            value=memory_bytes(records),
        )
        yield from (predicted, measured, trust, keys, resets, blocks, missed, replayed, memory)


class Telemetry:
    """All metrics of one router app."""

    def __init__(self, fleet: Fleet) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vllm_fleet_requests",
            "Requests answered, by replica and HTTP status",
            ["replica", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "vllm_fleet_request_duration_seconds",
            "Time from request received to response finished (streams: last chunk)",
            ["replica"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttfb = Histogram(
            "vllm_fleet_time_to_first_byte_seconds",
            "Time from request received to the first body byte sent to the client (TTFT "
            "for streams)",
            ["replica"],
            buckets=TTFB_BUCKETS,
            registry=self.registry,
        )
        self.retries = Counter(
            "vllm_fleet_retries",
            "Attempts that failed before any byte reached the client and were retried",
            ["reason"],
            registry=self.registry,
        )
        self.upstream_failures = Counter(
            "vllm_fleet_upstream_failures",
            "Failures on a replica, by replica and reason: attempts that failed before "
            "answering (refused, reset, 5xx, timeout to first byte) and streams it cut mid-way",
            ["replica", "reason"],
            registry=self.registry,
        )
        self.stream_errors = Counter(
            "vllm_fleet_stream_errors",
            "Streams cut by an upstream failure after bytes reached the client",
            ["reason"],
            registry=self.registry,
        )
        self.continuations = Counter(
            "vllm_fleet_stream_continuations_attempted",
            "Breaks of continuable streams that the router tried to continue on another replica",
            registry=self.registry,
        )
        self.continuations_succeeded = Counter(
            "vllm_fleet_stream_continuations_succeeded",
            "Streams that broke and still reached their end through continuations",
            registry=self.registry,
        )
        self.continuations_failed = Counter(
            "vllm_fleet_stream_continuations_failed",
            "Streams that broke and ended with the SSE error although continuation is on, "
            "by reason",
            ["reason"],
            registry=self.registry,
        )
        self.client_disconnects = Counter(
            "vllm_fleet_client_disconnects",
            "Requests whose client went away before the response finished",
            registry=self.registry,
        )
        self.abandoned = Counter(
            "vllm_fleet_abandoned_attempts",
            "Attempts waiting for a first byte on a replica found hung or ejected, cancelled "
            "there and re-sent elsewhere",
            registry=self.registry,
        )
        self.hung_ejections = Counter(
            "vllm_fleet_hung_ejections",
            "Replicas ejected because they held overdue requests and sent nothing",
            registry=self.registry,
        )
        self.hung_streams_cut = Counter(
            "vllm_fleet_hung_streams_cut",
            "Streams cut on a replica found hung (then continued elsewhere where possible)",
            registry=self.registry,
        )
        self.outlier_ejections = Counter(
            "vllm_fleet_outlier_ejections",
            "Replicas ejected because their 5xx rate was far above their peers'",
            registry=self.registry,
        )
        self.ejections_prevented = Counter(
            "vllm_fleet_ejections_prevented",
            "Ejections not made because --max-ejection-percent of the fleet was already out",
            registry=self.registry,
        )
        self.panic_requests = Counter(
            "vllm_fleet_panic_requests",
            "Requests sent to an ejected replica whose /health passes, because no healthy "
            "replica was left (panic mode)",
            registry=self.registry,
        )
        #: label children by replica (and status): labels() takes a lock and hashes its
        #: arguments on every call, which adds up at thousands of requests per second.
        self._requests_by: dict[tuple[str, int], Any] = {}
        self._latency_by: dict[str, Any] = {}
        self._ttfb_by: dict[str, Any] = {}
        for reason in REASONS:
            self.retries.labels(reason)
            self.stream_errors.labels(reason)
        for reason in CONTINUATION_FAILURES:
            self.continuations_failed.labels(reason)
        self.registry.register(FleetCollector(fleet))
        self.registry.register(PrefixCollector(fleet))
        #: What /metrics shows: this registry, or with --workers N one that merges every
        #: worker's counters (vllm_fleet.router.worker.merged_registry).
        self.exposed: CollectorRegistry = self.registry

    def observe_request(self, replica: str, status: int, elapsed: float) -> None:
        """One finished request: counted by replica and status, its duration recorded."""
        key = (replica, status)
        counter = self._requests_by.get(key)
        if counter is None:
            counter = self._requests_by[key] = self.requests.labels(replica, str(status))
        counter.inc()
        latency = self._latency_by.get(replica)
        if latency is None:
            latency = self._latency_by[replica] = self.latency.labels(replica)
        latency.observe(elapsed)
        if status == CLIENT_CLOSED:
            self.client_disconnects.inc()

    def observe_failure(self, replica: str, reason: str) -> None:
        self.upstream_failures.labels(replica, reason).inc()

    def observe_first_byte(self, replica: str, elapsed: float) -> None:
        ttfb = self._ttfb_by.get(replica)
        if ttfb is None:
            ttfb = self._ttfb_by[replica] = self.ttfb.labels(replica)
        ttfb.observe(elapsed)
