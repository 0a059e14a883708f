"""The report's PNGs, drawn with matplotlib from the `Plot` data a scenario returns.

Only `python -m bench` (in bench/.env, which has matplotlib) draws; rendering the markdown
(`python -m bench report`) and the tests never import this module.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.section import Plot


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
