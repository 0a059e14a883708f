"""What a scenario hands to the report: tables, plot data, notes and kept figures.

Scenarios build a `Section`; `bench.store` keeps it as JSON in bench/results (stamped with the
commit it measured), `bench.page` renders it to markdown and `bench.plots` draws its `Plot`s.
Nothing here imports matplotlib, so the project's own venv (tests, `python -m bench report`)
can read stored results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.load import RequestRecord
from bench.stamp import Stamp
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

    def markdown(self) -> str:
        """A GitHub markdown table; short rows are padded, pipes in cells escaped."""

        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(cell(h) for h in self.headers) + " |"]
        lines.append("|" + "|".join("---" for _ in self.headers) + "|")
        for row in self.rows:
            padded = list(row) + [""] * (len(self.headers) - len(row))
            lines.append("| " + " | ".join(cell(c) for c in padded) + " |")
        return "\n".join(lines)


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
    #: how long the scenario took and when it ran (for the report's footer).
    seconds: float = 0.0
    date: str = ""
    #: the code it measured (bench.stamp): short commit, and whether the tree differed from it
    #: (None: stored before the flag was recorded).
    commit: str = ""
    dirty: bool | None = None
    #: the machine it ran on (cores, CPU, memory, kernel, Python); empty when not recorded.
    machine: list[str] = field(default_factory=list)
    #: router name -> headline numbers (kept when the runs are not), for the summary table.
    facts: dict[str, dict[str, float]] = field(default_factory=dict)
    #: router name -> version string and settings, for the report's versions table.
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.commit, self.dirty)
