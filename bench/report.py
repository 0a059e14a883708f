"""The report: sections stored as JSON, rendered to one markdown page and matplotlib PNGs.

Each scenario's section is stored on its own (bench/results/<mode>/s<key>.json), and the page
is rebuilt from every stored section, so re-running one scenario updates its part of
docs/benchmarks.md and keeps the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.headline import headline
from bench.section import Plot, Section, Table


def markdown_table(table: Table) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in table.headers) + " |"]
    lines.append("|" + "|".join("---" for _ in table.headers) + "|")
    for row in table.rows:
        padded = list(row) + [""] * (len(table.headers) - len(row))
        lines.append("| " + " | ".join(cell(c) for c in padded) + " |")
    return "\n".join(lines)


# -- storage --------------------------------------------------------------------------------


def save_section(section: Section, directory: Path) -> Path:
    """Store everything but the raw runs (tables, text, plot data, facts)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = dataclasses.asdict(dataclasses.replace(section, runs=[]))
    path = directory / f"s{section.key}.json"
    path.write_text(json.dumps(data, indent=1, default=_nan_safe) + "\n")
    return path


def _nan_safe(value: object) -> object:
    return str(value)


def load_sections(directory: Path) -> list[Section]:
    sections = []
    for path in sorted(directory.glob("s*.json")):
        data: dict[str, Any] = json.loads(path.read_text())
        data["tables"] = [Table(**t) for t in data["tables"]]
        data["plots"] = [_plot(p) for p in data["plots"]]
        data["runs"] = []
        sections.append(Section(**data))
    return sorted(sections, key=lambda s: s.key)


def _plot(data: dict[str, Any]) -> Plot:
    def points(series: dict[str, list[list[float]]]) -> dict[str, list[tuple[float, float]]]:
        return {k: [(p[0], p[1]) for p in v] for k, v in series.items()}

    data["series"] = points(data["series"])
    data["series2"] = points(data["series2"])
    data["markers"] = [(m[0], m[1]) for m in data["markers"]]
    return Plot(**data)


# -- plots ----------------------------------------------------------------------------------


def draw(plot: Plot, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / plot.filename
    if plot.kind == "bars":
        _bars(plot, path)
    elif plot.kind == "sweep":
        _sweep(plot, path)
    else:
        _lines(plot, path)
    plt.close("all")
    return path


def _bars(plot: Plot, path: Path) -> None:
    names = plot.xlabel.split("|")
    fig, ax = plt.subplots(figsize=(max(7.0, 0.8 * len(names)), 4.5))
    width = 0.8 / max(1, len(plot.series))
    for i, (label, points) in enumerate(plot.series.items()):
        xs = [x + (i - (len(plot.series) - 1) / 2) * width for x, _ in points]
        ax.bar(xs, [y for _, y in points], width=width, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(plot.ylabel)
    ax.set_title(plot.title, fontsize=10)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _lines(plot: Plot, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for label, points in plot.series.items():
        ax.plot([x for x, _ in points], [y for _, y in points], label=label, linewidth=1.4)
    for x, text in plot.markers:
        ax.axvline(x, color="grey", linestyle="--", linewidth=1)
        ax.annotate(text, (x, 1), xycoords=("data", "axes fraction"), fontsize=8,
                    xytext=(4, -12), textcoords="offset points")  # fmt: skip
    ax.set_xlabel(plot.xlabel)
    ax.set_ylabel(plot.ylabel)
    ax.set_title(plot.title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _sweep(plot: Plot, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, points in plot.series.items():
        left.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    for label, points in plot.series2.items():
        right.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    left.set_xlabel(plot.xlabel)
    left.set_ylabel(plot.ylabel)
    right.set_xlabel(plot.xlabel)
    right.set_ylabel(plot.ylabel2)
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(plot.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- the page -------------------------------------------------------------------------------


def machine() -> list[str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return [
        f"{os.cpu_count()} cores ({cpu}){mem}, {platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
    ]


def render_page(
    sections: Sequence[Section], meta: dict[str, str], image_prefix: str, findings: str = ""
) -> str:
    by_key = {s.key: s for s in sections}
    out = [
        "# Benchmarks: vllm-fleet's router against the routers people use today",
        "",
        "Generated by `python -m bench` (see [Reproduce](#reproduce)); do not edit by hand. "
        "Every number below was measured on the machine described at the end, with every "
        "process (replicas, routers, load generator) on 127.0.0.1 and on the same cores.",
        "",
        "## Summary: routed vs direct, least-busy vs round-robin, one replica twice as slow",
        "",
    ]
    if "1" in by_key or "5" in by_key:
        out.append(
            "Latency, TTFT, errors and the slow replica's share are from scenario 1 (4 "
            "replicas, the 4th at half speed, 70% load); added latency and CPU are from "
            "scenario 5 (instant replicas), against the load generator spreading the same "
            "requests over the replicas itself."
        )
        out += ["", markdown_table(headline(by_key.get("1"), by_key.get("5"))), ""]
    else:
        out += ["Scenarios 1 and 5 have not been run yet.", ""]
    if findings.strip():
        out += [findings.strip(), ""]
    for section in sections:
        out += [f"## Scenario {section.key}: {section.title}", ""]
        for paragraph in section.text[:1]:
            out += [paragraph, ""]
        for table in section.tables:
            if table.title:
                out += [f"**{table.title}**", ""]
            out += [markdown_table(table), ""]
        for paragraph in section.text[1:]:
            out += [paragraph, ""]
        for plot in section.plots:
            out += [f"![{plot.title}]({image_prefix}{plot.filename})", ""]
    out += ["## Versions", "", "| router | version | settings |", "|---|---|---|"]
    versions: dict[str, str] = {}
    settings: dict[str, str] = {}
    for section in sections:
        for name, version in section.versions.items():
            versions.setdefault(name, version)
        for name, text in section.settings.items():
            settings.setdefault(name, text)
    for name, version in sorted(versions.items()):
        out.append(f"| {name} | {version or '-'} | {settings.get(name, '')} |")
    out += ["", "## Machine and run", ""]
    out += [f"- {line}" for line in machine()]
    for key in ("mode", "seed", "runs"):
        if key in meta:
            out.append(f"- {key}: {meta[key]}")
    out += ["", "## Reproduce", "", REPRODUCE, ""]
    return "\n".join(out)


REPRODUCE = """\
```
python -m bench                    # scenarios 1-6 (under 25 minutes), rewrites this page
python -m bench --scenarios 7      # real vLLM on the CPU (needs an interpreter with vllm)
python -m bench --quick            # a couple of minutes, writes bench/.work/benchmarks-quick.md
python -m bench --scenarios 1,5    # only these; the other sections keep their last results
python -m bench --peers ours-lb,nginx-lc --scenarios 1
python -m bench --render-only      # rebuild this page from bench/results (after editing
                                   # bench/findings.md)
```
`python -m bench` first runs `bench/setup.sh` (nginx and HAProxy from Debian; vllm-fleet,
matplotlib, vllm-router and sglang-router into `bench/.env`), then re-runs itself from that venv.
Each router gets its own generated config and free ports on 127.0.0.1 (`bench/peers.py`);
every process is stopped at the end, also on failure. Raw logs and configs land in
`bench/.work/`. A router that cannot start is listed as "not started" with the reason."""
