"""The data-path harness's arithmetic (bench.dataplane) and its py-spy summary
(bench.dataplane_profile); the harness's runs themselves are measurements, not asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.dataplane import Result, parse_args, summary
from bench.dataplane_profile import summarize


def test_summary_gives_the_median_and_spread_per_load_and_idle_per_second() -> None:
    results = [
        Result("stream@new", 10, 0, 0.150, 5.0),
        Result("stream@new", 10, 0, 0.130, 5.0),
        Result("stream@new", 10, 0, 0.170, 5.0),
        Result("idle@new", 0, 0, 0.030, 10.0),
    ]
    text = summary(results)
    assert "stream@new ms/req: median 15.000 (13.000-17.000)" in text
    assert "idle@new CPU ms per s: median 3.0 (3.0-3.0)" in text


def test_unknown_load_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--loads", "stream,bogus"])
    assert "--loads: unknown bogus" in capsys.readouterr().err


def test_trees_are_labelled_and_default_to_the_installed_router() -> None:
    assert parse_args([]).trees == {"installed": ""}
    assert parse_args(["--trees", "a=/x,b=/y"]).trees == {"a": "/x", "b": "/y"}


def test_profile_summary_separates_self_and_inclusive_time(tmp_path: Path) -> None:
    stacks = tmp_path / "p.txt"
    stacks.write_text(
        "main (a/app.py:1);relay (router/relay.py:9);write (aiohttp/http_writer.py:3) 6\n"
        "main (a/app.py:1);relay (router/relay.py:9) 2\n"
        "main (a/app.py:1);select (lib/selectors.py:4) 2\n"
    )
    text = summarize(stacks, top=5)
    assert "10 samples, 2 idle (20%)" in text
    self_part, inclusive_part = text.split("-- inclusive")
    assert "75.0%  write (aiohttp/http_writer.py)" in self_part
    assert "100.0%  relay (router/relay.py)" in inclusive_part
