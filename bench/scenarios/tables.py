"""Formatting shared by the scenarios' tables: numbers, missing peers, the latency table."""

from __future__ import annotations

from collections.abc import Sequence

from bench.fmt import fmt_ms, fmt_pct, fmt_s
from bench.section import PeerRun, Table
from bench.stats import window_tokens_per_s


def not_started_row(run: PeerRun, width: int) -> list[str]:
    return [run.name, f"not started: {run.unavailable}"[:160]] + [""] * (width - 2)


def latency_table(runs: Sequence[PeerRun], replica_labels: Sequence[str], window: float) -> Table:
    """One row per router; throughput is output tokens delivered during the first `window`
    seconds (the load window), see bench.stats.window_tokens_per_s."""
    headers = [
        "router",
        "requests",
        "errors",
        "latency mean (s)",
        "p50 (s)",
        "p99 (s)",
        "p99 ms/token",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "output tok/s in load window",
        *[f"share {label}" for label in replica_labels],
        "router CPU ms/req",
    ]
    rows = []
    for run in runs:
        if run.unavailable:
            rows.append(not_started_row(run, len(headers)))
            continue
        s = run.summary
        rows.append(
            [
                run.name,
                str(s.requests),
                str(s.errors),
                fmt_s(s.latency_mean),
                fmt_s(s.latency_p50),
                fmt_s(s.latency_p99),
                fmt_ms(s.per_token_p99),
                fmt_ms(s.ttft_p50),
                fmt_ms(s.ttft_p99),
                f"{window_tokens_per_s(run.records, 0.0, window):.0f}",
                *[fmt_pct(x) for x in run.shares],
                "-" if run.cpu_s is None else f"{run.cpu_ms_per_request:.2f}",
            ]
        )
    return Table(headers, rows)
