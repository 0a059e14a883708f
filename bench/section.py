"""What a scenario hands to the report: tables, plot data, notes and kept figures.

Scenarios build a `Section`; `bench.store` keeps it as JSON in bench/results, `bench.page`
renders it to markdown and `bench.plots` draws its `Plot`s. Nothing here imports matplotlib, so
the project's own venv (tests, `python -m bench report`) can read stored results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.load import RequestRecord
from bench.stats import Summary, summarize


@dataclass
class PeerRun:
    """One router's run in one scenario (or why it did not run)."""

    key: str
    name: str
    settings: str = ""
    version: str = ""
    unavailable: str = ""
    records: list[RequestRecord] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    cpu_s: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    #: the replicas' URLs in fleet order, to map per-request replica labels to an index.
    replica_urls: list[str] = field(default_factory=list)

    @property
    def summary(self) -> Summary:
        return summarize(self.records)

    @property
    def cpu_ms_per_request(self) -> float:
        if self.cpu_s is None or not self.records:
            return math.nan
        return 1000 * self.cpu_s / len(self.records)


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]
    title: str = ""


@dataclass(frozen=True)
class Plot:
    """Data for one PNG; `kind` picks the drawing function in bench.report."""

    kind: str
    filename: str
    title: str
    #: series name -> (x, y) points.
    series: dict[str, list[tuple[float, float]]]
    xlabel: str
    ylabel: str
    #: optional second panel (same series names), e.g. p99 beside throughput.
    series2: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    ylabel2: str = ""
    #: x positions of vertical markers with labels.
    markers: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Section:
    key: str
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    plots: list[Plot] = field(default_factory=list)
    runs: list[PeerRun] = field(default_factory=list)
    #: how long the scenario took, when and at which commit it ran (for the report's footer).
    seconds: float = 0.0
    date: str = ""
    commit: str = ""
    #: router name -> headline numbers (kept when the runs are not), for the summary table.
    facts: dict[str, dict[str, float]] = field(default_factory=dict)
    #: router name -> version string and settings, for the report's versions table.
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)
