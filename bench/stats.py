"""Numbers out of request records: pure functions, no I/O, so the report can be tested alone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.load import RequestRecord


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@dataclass(frozen=True)
class Summary:
    """What one run of one router looked like from the client."""

    requests: int
    errors: int
    latency_mean: float
    latency_p50: float
    latency_p99: float
    ttft_mean: float
    ttft_p50: float
    ttft_p99: float
    #: output tokens of successful requests per second of the run.
    tokens_per_s: float
    #: successful requests per second of the run.
    requests_per_s: float
    #: seconds from the first send to the last answer.
    span: float
    #: latency per output token (s/token) of successful requests: length-independent, so it
    #: shows queueing and slow replicas that plain latency hides behind request lengths.
    per_token_p50: float
    per_token_p99: float


def summarize(records: Sequence[RequestRecord]) -> Summary:
    ok = [r for r in records if r.ok]
    latencies = [r.latency for r in ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    span = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    tokens = sum(r.tokens for r in ok)
    per_token = [r.latency / r.tokens for r in ok if r.tokens]
    return Summary(
        requests=len(records),
        errors=len(records) - len(ok),
        latency_mean=mean(latencies),
        latency_p50=percentile(latencies, 50),
        latency_p99=percentile(latencies, 99),
        ttft_mean=mean(ttfts),
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        tokens_per_s=tokens / span if span > 0 else math.nan,
        requests_per_s=len(ok) / span if span > 0 else math.nan,
        span=span,
        per_token_p50=percentile(per_token, 50),
        per_token_p99=percentile(per_token, 99),
    )


def shares(before: Sequence[int], after: Sequence[int]) -> list[float]:
    """Fraction of the run's requests each replica received (from its own counter)."""
    deltas = [max(0, a - b) if a >= 0 and b >= 0 else 0 for a, b in zip(after, before, strict=True)]
    total = sum(deltas)
    return [d / total if total else math.nan for d in deltas]


def window_tokens_per_s(records: Sequence[RequestRecord], start: float, end: float) -> float:
    """Output tokens delivered per second inside [start, end] (the load window).

    Tokens are taken as spread evenly from a request's first token (its end when not
    streamed) to its end. Unlike tokens / whole span, one long request finishing late does not
    decide the number, and work a router left queued past the window counts against it.
    """
    delivered = 0.0
    for r in records:
        if not r.ok or not r.tokens:
            continue
        first = r.start + r.ttft if r.ttft is not None else r.end
        if r.end <= first:
            delivered += r.tokens if start <= r.end <= end else 0
            continue
        overlap = max(0.0, min(end, r.end) - max(start, first))
        delivered += r.tokens * overlap / (r.end - first)
    return delivered / (end - start)


def per_token_series(
    records: Sequence[RequestRecord], bin_s: float, q: float = 90
) -> list[tuple[float, float]]:
    """(bin start, q-th percentile of ms per output token of requests sent in that bin)."""
    bins: dict[int, list[float]] = {}
    for record in records:
        if record.ok and record.tokens:
            bins.setdefault(int(record.start // bin_s), []).append(
                1000 * record.latency / record.tokens
            )
    return [(k * bin_s, percentile(v, q)) for k, v in sorted(bins.items())]


def replica_index(label: str, urls: Sequence[str]) -> int | None:
    """Which replica a per-request label names, or None.

    Labels are a replica URL (client-side targets, ours), nginx's `$upstream_addr` (host:port,
    comma-separated when it retried: the last one answered) or HAProxy's server name `rN`.
    """
    last = label.split(",")[-1].strip()
    if not last:
        return None
    if last[0] == "r" and last[1:].isdigit():
        return int(last[1:])
    for index, url in enumerate(urls):
        if last.rstrip("/").endswith(url.removeprefix("http://").rstrip("/")):
            return index
    return None
