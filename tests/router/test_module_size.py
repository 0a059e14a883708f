"""The router's modules stay small enough to find things in (issue 16: proxy.py had grown to
826 lines holding parsing, failover, relaying and the handler at once)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: A module longer than this holds more than a reader looks for in one place.
MAX_LINES = 500


def test_router_modules_stay_under_the_limit() -> None:
    lengths = {
        path.name: len(path.read_text(encoding="utf-8").splitlines())
        for path in sorted((ROOT / "router").glob("*.py"))
    }
    assert lengths, "no router modules found"
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}
