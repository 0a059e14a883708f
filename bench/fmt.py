"""How figures are written in every table (scenario tables, the headline): "-" for missing."""

from __future__ import annotations

import math


def fmt_s(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def fmt_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{1000 * value:.0f}"


def fmt_pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.0f}%"


def fmt_added(value: float, base: float) -> str:
    """`value - base` in ms with a sign, "-" when either is missing."""
    if math.isnan(value) or math.isnan(base):
        return "-"
    return f"{1000 * (value - base):+.1f}"
