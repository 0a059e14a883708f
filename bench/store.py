"""bench/results: one JSON file per scenario (`s<key>.json`), everything but the raw runs.

Each scenario is stored on its own, so re-running one scenario replaces its file and keeps the
others; the pages are rebuilt from every stored section.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from bench.section import Plot, Section, Table


def save_section(section: Section, directory: Path) -> Path:
    """Store everything but the raw runs (tables, text, plot data, facts, stamp)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = dataclasses.asdict(dataclasses.replace(section, runs=[]))
    path = directory / f"s{section.key}.json"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def load_sections(directory: Path) -> list[Section]:
    """Every stored section, by key; fields added since a file was written take defaults."""
    sections = []
    for path in sorted(directory.glob("s*.json")):
        data: dict[str, Any] = json.loads(path.read_text())
        data["tables"] = [Table(**t) for t in data["tables"]]
        data["plots"] = [_plot(p) for p in data["plots"]]
        data["runs"] = []
        sections.append(Section(**data))
    return sorted(sections, key=lambda s: (len(s.key), s.key))


def _plot(data: dict[str, Any]) -> Plot:
    def points(series: dict[str, list[list[float]]]) -> dict[str, list[tuple[float, float]]]:
        return {k: [(p[0], p[1]) for p in v] for k, v in series.items()}

    data["series"] = points(data["series"])
    data["series2"] = points(data["series2"])
    data["markers"] = [(m[0], m[1]) for m in data["markers"]]
    return Plot(**data)
