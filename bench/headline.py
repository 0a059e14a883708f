"""The summary table of docs/benchmarks.md, from the figures the sections keep."""

from __future__ import annotations

import math

from bench.scenarios.tables import fmt_added, fmt_ms, fmt_pct, fmt_s
from bench.section import Section, Table

HEADLINE_ROUTERS = (
    ("ideal (client JSQ)", "ideal: client-side least-busy, no proxy"),
    ("direct round-robin", "client-side round robin, no proxy"),
    ("ours cost", "ours, cost (the default)"),
    ("ours least-busy", "ours, least-busy"),
    ("ours round-robin", "ours, round-robin"),
)


def headline(s1: Section | None, s5: Section | None) -> Table:
    """Routed vs direct, least-busy vs round robin, one replica at half speed (S1 + S5)."""
    headers = [
        "",
        "p50 latency (s)",
        "p99 latency (s)",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "errors",
        "share of the ½-speed replica",
        "added p50/p99 (ms), 1 in flight",
        "added p50/p99 (ms), 64 in flight",
        "router CPU ms/req",
    ]
    rows = []
    for name, label in HEADLINE_ROUTERS:
        f1 = s1.facts.get(name) if s1 else None
        c1 = s5.facts.get(f"{name} @1") if s5 else None
        c64 = s5.facts.get(f"{name} @64") if s5 else None
        if f1 is None and c1 is None:
            continue
        row = [label]
        if f1 is not None:
            row += [
                fmt_s(f1["latency_p50"]),
                fmt_s(f1["latency_p99"]),
                fmt_ms(f1["ttft_p50"]),
                fmt_ms(f1["ttft_p99"]),
                f"{f1['errors']:.0f}",
                fmt_pct(f1["last_replica_share"]),
            ]
        else:
            row += ["-"] * 6
        if name.startswith("ours") and s5 is not None:
            base1 = s5.facts.get("direct round-robin @1")
            base64 = s5.facts.get("direct round-robin @64")
            row.append(_added_pair(c1, base1))
            row.append(_added_pair(c64, base64))
            cpu = (c64 or {}).get("cpu_ms_per_request", math.nan)
            row.append("-" if math.isnan(cpu) else f"{cpu:.2f}")
        elif name == "direct round-robin" and s5 is not None:
            row += ["0 / 0 (baseline)", "0 / 0 (baseline)", "-"]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    return Table(headers, rows)


def _added_pair(run: dict[str, float] | None, base: dict[str, float] | None) -> str:
    if run is None or base is None:
        return "-"
    return (
        f"{fmt_added(run['latency_p50'], base['latency_p50'])} / "
        f"{fmt_added(run['latency_p99'], base['latency_p99'])}"
    )
