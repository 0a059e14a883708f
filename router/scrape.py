"""Engine load gauges from each replica's Prometheus /metrics endpoint.

The router's own in-flight count is instant but misses load from other clients; the engine's
gauges see everything but are ~1 s old. The balancer combines both
(vllm_fleet.router.load.load_score). A failed scrape keeps the last values: their age
(``scraped_at``) already makes the balancer trust them less, and ejecting is the health checker's
job, not ours.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from vllm_fleet.router.peers import peer_in_flight
from vllm_fleet.router.prefix_index import DEFAULT_CACHE_TOKENS, DEFAULT_MEMORY_BYTES, fit_budget
from vllm_fleet.router.replica_tasks import ReplicaTasks
from vllm_fleet.router.speed import CounterSample
from vllm_fleet.router.state import Fleet, ReplicaState
from vllm_fleet.router.upstream_client import UpstreamClient

log = logging.getLogger("vllm_fleet.router")

#: Largest /metrics body we accept. vLLM's is ~100 KB per engine with all histograms; anything
#: far bigger is not a vLLM engine, and reading it would only waste memory and time.
MAX_METRICS_BYTES = 4 << 20

#: vLLM exports a handful of lines per wanted family per engine; far more means a hostile or
#: broken endpoint, and parsing them would stall the event loop.
MAX_RELEVANT_LINES = 2048

#: Keys one replica's prefix record may hold when the caller gives no memory cap.
DEFAULT_BUDGET = 1 << 62

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
#: vLLM V1 name first, then the V0 name it replaced (both are fractions in [0, 1]).
KV_CACHE_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
#: Counter family (the parser strips ``_total``; the sample keeps it).
GENERATION_TOKENS = "vllm:generation_tokens"
PROMPT_TOKENS = "vllm:prompt_tokens"
PREEMPTIONS = "vllm:num_preemptions"
#: Finished requests, one sample per finish reason (summed).
REQUEST_SUCCESS = "vllm:request_success"
#: Histograms whose _sum and _count the speed estimator uses (vllm_fleet.router.speed); buckets are
#: dropped before parsing. Inter-token latency: current name first, then the older name of the
#: same per-token histogram.
INTER_TOKEN_LATENCY = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
#: Tokens per engine step; its count is the number of steps. The family name ends in _total,
#: which the parse strips like a counter's.
ITERATION_TOKENS = "vllm:iteration_tokens"
PREFILL_TIME = "vllm:request_prefill_time_seconds"
QUEUE_TIME = "vllm:request_queue_time_seconds"
REQUEST_PROMPT_TOKENS = "vllm:request_prompt_tokens"
#: Prefix-cache counters (tokens): what the replica found cached, of what it looked up.
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits"
PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries"
#: Info gauge whose labels carry the KV cache size: num_gpu_blocks x block_size tokens.
CACHE_CONFIG = "vllm:cache_config_info"


@dataclass(frozen=True)
class EngineMetrics:
    """The engine gauges and counters the router uses, summed over label sets (model_name,
    engine, finished_reason); a counter or histogram the replica does not export is None."""

    running: float
    waiting: float
    #: Fullest engine's KV-cache usage in [0, 1] (max, not sum, over label sets: a fraction).
    kv_cache_usage: float
    generation_tokens_total: float | None = None
    prompt_tokens_total: float | None = None
    num_preemptions_total: float | None = None
    request_success_total: float | None = None
    inter_token_latency_sum: float | None = None
    inter_token_latency_count: float | None = None
    #: Engine steps so far (count of the vllm:iteration_tokens_total histogram).
    iterations: float | None = None
    prefill_time_sum: float | None = None
    prefill_time_count: float | None = None
    request_prompt_tokens_sum: float | None = None
    queue_time_sum: float | None = None
    queue_time_count: float | None = None
    prefix_cache_hits_total: float | None = None
    prefix_cache_queries_total: float | None = None
    #: KV cache blocks (summed over engines) and tokens per block, from vllm:cache_config_info.
    cache_blocks: float | None = None
    cache_block_size: int | None = None


#: Families the router reads; lines of any other family are dropped before parsing.
WANTED = (
    RUNNING,
    WAITING,
    GENERATION_TOKENS,
    PROMPT_TOKENS,
    PREEMPTIONS,
    REQUEST_SUCCESS,
    ITERATION_TOKENS,
    PREFILL_TIME,
    QUEUE_TIME,
    REQUEST_PROMPT_TOKENS,
    PREFIX_CACHE_HITS,
    PREFIX_CACHE_QUERIES,
    CACHE_CONFIG,
    *INTER_TOKEN_LATENCY,
    *KV_CACHE_USAGE,
)


#: Sample names the parse reads: a WANTED family, its counter's _total, its histogram's _sum /
#: _count (vllm:iteration_tokens_total is a histogram: _total_sum, _total_count).
_SUFFIXES = r"(?:_total)?(?:_sum|_count)?"
#: One wanted sample line, from the newline before it to its end. Every line of vLLM's
#: exposition starts with "vllm:" or "#", so the literal lets the regular expression engine skip
#: to line starts, and only the few dozen lines the parse reads are handed to Python: buckets,
#: _created samples, HELP/TYPE lines and other families (vllm:num_requests_waiting_by_reason
#: shares a prefix) never match. The name must end at its labels or its value.
_WANTED_LINE = re.compile(
    r"\n(vllm:(?:"
    + "|".join(re.escape(name[len("vllm:") :]) for name in sorted(WANTED, key=len, reverse=True))
    + rf"){_SUFFIXES}(?=[{{ \t])[^\n\r]*)"
)


def _wanted_lines(text: str) -> list[str]:
    """The sample lines of WANTED families the parse reads (no buckets, no comments).

    vLLM exports ~100 KB of histograms of which we need a few sums and counts; a Python loop
    over its ~900 lines took 0.8 ms per scrape, one regular expression over the text takes
    0.3 ms (bench/findings.md, "Data path profile"), so a scrape never stalls the event loop,
    whatever the replica sends.
    """
    kept: list[str] = _WANTED_LINE.findall("\n" + text)
    if len(kept) > MAX_RELEVANT_LINES:
        raise ValueError(f"over {MAX_RELEVANT_LINES} lines of load gauges: not vLLM")
    return kept


#: One sample line: name, optional {labels}, value, optional timestamp. The label text is only
#: checked for its quoting (a brace or a quote inside a quoted value, escapes): only
#: vllm:cache_config_info's labels are read (_labels), and a per-label pattern cost ~6 us a
#: line where this one costs ~2.
_SAMPLE_RE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>[^"}]*(?:"[^"\\\n]*(?:\\.[^"\\\n]*)*"[^"}]*)*)\})?'
    r"[ \t]+(?P<value>\S+)(?:[ \t]+-?\d+)?[ \t]*"
)
_LABEL_RE = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>[^"\\\n]*(?:\\.[^"\\\n]*)*)"')


def _samples(lines: list[str]) -> list[tuple[str, str, float]]:
    """(sample name, raw label text, value) of every sample line.

    The relevant lines are a few dozen: one regular expression each, where prometheus_client's
    character-by-character parser took ~2.6 ms per scrape of the simulator's exposition (~25
    us a line), which at 4 replicas scraped every second was a third of scenario 1's router
    CPU per request (bench/findings.md, "Data path profile"). Malformed lines raise ValueError.
    """
    out = []
    for line in lines:
        match = _SAMPLE_RE.fullmatch(line)
        if match is None:
            raise ValueError(f"not Prometheus text format: {line[:80]!r}")
        try:
            value = float(match["value"])
        except ValueError:
            raise ValueError(f"not Prometheus text format: value in {line[:80]!r}") from None
        out.append((match["name"], match["labels"] or "", value))
    return out


def _labels(text: str) -> dict[str, str]:
    """The label set of a sample, escapes undone (only vllm:cache_config_info's is read)."""
    unescape = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
    return {
        m["key"]: re.sub(r"\\.", lambda e: unescape.get(e[0], e[0]), m["value"])
        for m in _LABEL_RE.finditer(text)
    }


def _family_name(name: str) -> str:
    # Typed counters come as family "x" with sample "x_total"; untyped ones as "x_total".
    return name[: -len("_total")] if name.endswith("_total") else name


def parse_vllm_metrics(text: str) -> EngineMetrics:
    """Parse vLLM's text exposition; raise ValueError when it is not usable vLLM metrics.

    Requires vllm:num_requests_running and vllm:num_requests_waiting; KV-cache usage defaults
    to 0 when neither name is exported. Non-finite or negative values are rejected rather than
    fed to the balancer. Input over MAX_METRICS_BYTES is refused without parsing.
    """
    if len(text) > MAX_METRICS_BYTES:
        raise ValueError(f"metrics text is {len(text)} bytes, over the {MAX_METRICS_BYTES} cap")
    relevant = _wanted_lines(text)
    # (family, part) -> values; part is "" for gauges and counters, "sum"/"count" for histograms.
    values: dict[tuple[str, str], list[float]] = {}
    cache_blocks: float | None = None
    block_size: int | None = None
    for sample, labels, value in _samples(relevant):
        part = _sample_part(sample)
        if part is None:  # creation timestamps, buckets
            continue
        base = sample[: -len(part) - 1] if part else sample
        name = _family_name(base)
        if name not in WANTED:
            continue  # e.g. vllm:num_requests_waiting_by_reason shares the prefix
        if name == CACHE_CONFIG:
            blocks, size = _cache_size(_labels(labels))
            if blocks is not None:
                cache_blocks = (cache_blocks or 0.0) + blocks
            block_size = size if size is not None else block_size
            continue
        values.setdefault((name, part), []).append(value)
    for (name, _), vals in values.items():
        if any(not math.isfinite(v) or v < 0 for v in vals):
            raise ValueError(f"{name}: non-finite or negative value in {vals}")
    running = values.get((RUNNING, ""))
    waiting = values.get((WAITING, ""))
    if running is None or waiting is None:
        raise ValueError(f"no {RUNNING} / {WAITING} gauges: not a vLLM /metrics endpoint")
    kv = next((values[(n, "")] for n in KV_CACHE_USAGE if (n, "") in values), [0.0])

    def total(name: str, part: str = "") -> float | None:
        vals = values.get((name, part))
        return sum(vals) if vals is not None else None

    itl = next((n for n in INTER_TOKEN_LATENCY if (n, "count") in values), INTER_TOKEN_LATENCY[0])
    return EngineMetrics(
        running=sum(running),
        waiting=sum(waiting),
        kv_cache_usage=min(1.0, max(kv)),
        generation_tokens_total=total(GENERATION_TOKENS),
        prompt_tokens_total=total(PROMPT_TOKENS),
        num_preemptions_total=total(PREEMPTIONS),
        request_success_total=total(REQUEST_SUCCESS),
        inter_token_latency_sum=total(itl, "sum"),
        inter_token_latency_count=total(itl, "count"),
        iterations=total(ITERATION_TOKENS, "count"),
        prefill_time_sum=total(PREFILL_TIME, "sum"),
        prefill_time_count=total(PREFILL_TIME, "count"),
        request_prompt_tokens_sum=total(REQUEST_PROMPT_TOKENS, "sum"),
        queue_time_sum=total(QUEUE_TIME, "sum"),
        queue_time_count=total(QUEUE_TIME, "count"),
        prefix_cache_hits_total=total(PREFIX_CACHE_HITS),
        prefix_cache_queries_total=total(PREFIX_CACHE_QUERIES),
        cache_blocks=cache_blocks,
        cache_block_size=block_size,
    )


def _cache_size(labels: dict[str, str]) -> tuple[float | None, int | None]:
    """(num_gpu_blocks, block_size) from vllm:cache_config_info's labels; None where absent
    or not a positive number ("None" before the engine sized its cache)."""

    def positive(key: str) -> float | None:
        try:
            value = float(labels.get(key, ""))
        except ValueError:
            return None
        return value if math.isfinite(value) and value > 0 else None

    size = positive("block_size")
    return positive("num_gpu_blocks"), int(size) if size is not None else None


def _sample_part(sample_name: str) -> str | None:
    """ "sum" / "count" for histogram samples, "" for a gauge's or counter's value, None to skip."""
    if sample_name.endswith(("_created", "_bucket")):
        return None
    if sample_name.endswith("_sum"):
        return "sum"
    if sample_name.endswith("_count"):
        return "count"
    return ""


def counter_sample(m: EngineMetrics, at: float) -> CounterSample:
    """The part of one scrape the speed estimator learns from."""
    return CounterSample(
        at=at,
        running=m.running,
        waiting=m.waiting,
        generation_tokens=m.generation_tokens_total,
        itl_sum=m.inter_token_latency_sum,
        itl_count=m.inter_token_latency_count,
        steps=m.iterations,
        finished=m.request_success_total,
        prefill_s=m.prefill_time_sum,
        prefill_prompt_tokens=m.request_prompt_tokens_sum,
        prefill_requests=m.prefill_time_count,
        queue_s=m.queue_time_sum,
        queued=m.queue_time_count,
        cached_tokens=m.prefix_cache_hits_total,
    )


def apply_metrics(
    r: ReplicaState,
    m: EngineMetrics,
    now: float,
    in_flight_at_scrape: int | None = None,
    prefix_budget: int = DEFAULT_BUDGET,
) -> None:
    """Store one successful scrape on the replica record and feed its speed estimate.

    ``in_flight_at_scrape`` is the router's in-flight count for ``r`` when the engine produced
    the numbers (default: now); the balancer subtracts it, and the other routers' count
    (vllm_fleet.router.peers), to see only other clients' load.
    """
    r.in_flight_at_scrape = r.in_flight if in_flight_at_scrape is None else in_flight_at_scrape
    r.peer_in_flight_at_scrape = peer_in_flight(r, now)
    r.running = m.running
    r.waiting = m.waiting
    r.kv_cache_usage = m.kv_cache_usage
    r.generation_tokens_total = m.generation_tokens_total
    r.scraped_at = now
    r.speed.observe(counter_sample(m, now))
    apply_prefix_metrics(r, m, now, prefix_budget)


def apply_prefix_metrics(r: ReplicaState, m: EngineMetrics, now: float, budget: int) -> None:
    """Size the replica's prefix record from its KV cache and check it against the replica's
    own prefix-cache counters (vllm_fleet.router.prefix_index)."""
    prefixes = r.prefixes
    prefixes.reply_tokens = r.speed.tokens_per_request or 0.0
    if m.cache_blocks is not None and m.cache_block_size is not None:
        prefixes.set_capacity(m.cache_blocks * m.cache_block_size, m.cache_block_size, budget)
    else:
        prefixes.set_capacity(DEFAULT_CACHE_TOKENS, prefixes.block_tokens, budget)
    if m.prefix_cache_hits_total is not None and m.prefix_cache_queries_total is not None:
        prefixes.observe_counters(m.prefix_cache_hits_total, m.prefix_cache_queries_total, now)


async def fetch_metrics_text(client: UpstreamClient, base: str, timeout_s: float) -> str:
    """GET ``base``/metrics and return the body, refusing bodies over MAX_METRICS_BYTES."""
    answer = await client.get(base, "/metrics", timeout_s, MAX_METRICS_BYTES)
    if answer.status != 200:
        raise ValueError(f"HTTP {answer.status}")
    return answer.body.decode("utf-8", errors="replace")


async def scrape_replica(
    client: UpstreamClient,
    r: ReplicaState,
    timeout_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    prefix_budget: int = DEFAULT_BUDGET,
) -> None:
    """Scrape ``r``'s /metrics into its record; on failure keep the old values, never raise.

    Failures are logged once when they start and once when they stop, not every second.
    """
    # The engine renders its gauges somewhere between sending and receiving; taking the larger
    # of our two counts errs toward "that load was ours", never toward phantom external load.
    in_flight_before = r.in_flight
    try:
        text = await fetch_metrics_text(client, r.url, timeout_s)
        metrics = parse_vllm_metrics(text)
    except asyncio.TimeoutError:
        _scrape_failed(r, f"timeout after {timeout_s:g}s")
        return
    except (aiohttp.ClientError, ValueError) as exc:
        _scrape_failed(r, f"{type(exc).__name__}: {exc}"[:200])
        return
    apply_metrics(r, metrics, clock(), max(in_flight_before, r.in_flight), prefix_budget)
    if r.scrape_error:
        log.info("replica metrics scrape recovered url=%s", r.url)
        r.scrape_error = ""


def _scrape_failed(r: ReplicaState, reason: str) -> None:
    if not r.scrape_error:
        log.warning("replica metrics scrape failed url=%s reason=%s", r.url, reason)
    r.scrape_error = reason


async def scrape_round(
    fleet: Fleet,
    client: UpstreamClient,
    *,
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
    prefix_memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> None:
    """Scrape, concurrently, every replica the health checker last found reachable."""
    targets = [r for r in list(fleet.replicas.values()) if r.check_ok]
    budget = fit_budget(len(fleet.replicas), prefix_memory_bytes)
    await asyncio.gather(
        *(scrape_replica(client, r, timeout_s, clock=clock, prefix_budget=budget) for r in targets)
    )


async def scrape_loop(
    fleet: Fleet,
    client: UpstreamClient,
    *,
    interval_s: float = 1.0,
    timeout_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    prefix_memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> None:
    """Scrape every reachable replica every ``interval_s`` forever; cancel the task to stop.

    Only replicas whose last health check passed (``check_ok``) are scraped: the others are
    down or starting, and the balancer never sees them anyway. Each tick starts a scrape for
    every such replica that has none in progress, so a slow replica never delays the others.
    """
    running = ReplicaTasks("metrics scrape")
    try:
        while True:
            started = clock()
            budget = fit_budget(len(fleet.replicas), prefix_memory_bytes)
            for r in list(fleet.replicas.values()):
                if r.check_ok and not running.busy(r.url):
                    scrape = scrape_replica(client, r, timeout_s, clock=clock, prefix_budget=budget)
                    running.start(r.url, scrape)
            await asyncio.sleep(max(0.0, interval_s - (clock() - started)))
    finally:
        await running.close()
