"""The published figures: README.md's headline block and docs/benchmarks.md are exactly what
bench/results give, every figure names its scenario and the commit it was measured at, and a
run stamps the commit (and a dirty tree) into what it stores."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.__main__ import full_pages, main, run_scenarios
from bench.headline import END, START, headline_block, headline_table, splice
from bench.page import Pages, findings_note, render_page, rendered
from bench.scenarios import Options
from bench.section import Section, Table
from bench.stamp import Stamp, current_stamp, run_stamp
from bench.store import load_sections, save_section

REPO = Path(__file__).resolve().parents[2]


def test_readme_and_benchmarks_page_are_what_the_results_generate() -> None:
    for path, expected in rendered(full_pages()).items():
        assert path.read_text() == expected, (
            f"{path.relative_to(REPO)} is not what bench/results generate: run "
            "`python -m bench report` (never edit the figures by hand)"
        )


def test_report_check_passes_on_the_committed_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--check"]) == 0


def _facts(mean: float, cpu: float) -> dict[str, float]:
    return {
        "latency_mean": mean, "latency_p50": mean / 2, "latency_p99": 4 * mean,
        "ttft_p50": 0.02, "ttft_p99": 0.1, "errors": 0.0, "requests": 100.0,
        "tokens_per_s": 500.0, "requests_per_s": 1500.0, "cpu_ms_per_request": cpu,
        "last_replica_share": 0.1,
    }  # fmt: skip


def sections() -> list[Section]:
    s1 = Section("1", "heterogeneous", commit="aaaaaaa", dirty=False, date="d1")
    s1.facts = {"ours cost": _facts(3.0, 7.5), "nginx least_conn": _facts(3.5, 3.25)}
    s5 = Section("5", "overhead", commit="bbbbbbb", dirty=True, date="d5")
    s5.facts = {
        "direct round-robin @1": _facts(0.003, float("nan")),
        "ours cost @1": _facts(0.0032, 0.9),
        "ours cost @64": _facts(0.04, 0.375),
    }
    s7 = Section("7", "real vLLM", commit="ccccccc", dirty=None, date="d7")
    s7.facts = {"ours cost": _facts(0.1, 2.5)}
    return [s1, s5, s7]


def test_every_headline_column_names_its_scenario_and_streamed_cpu_sits_beside_instant() -> None:
    table = headline_table(sections())
    assert table.headers[0] == "router"
    assert all(h.split()[0] in {"S1", "S5", "S7"} for h in table.headers[1:]), table.headers
    cpu = [h for h in table.headers if "CPU" in h]
    assert [h.split()[0] for h in cpu] == ["S5", "S1", "S7"]
    positions = [table.headers.index(h) for h in cpu]
    assert positions == list(range(positions[0], positions[0] + 3))  # side by side
    ours = next(r for r in table.rows if "cost" in r[0])
    by_header = dict(zip(table.headers, ours, strict=True))
    assert by_header["S1 router CPU ms/req (streamed)"] == "7.50"
    assert by_header["S5 router CPU ms/req (instant replicas, 64 in flight)"] == "0.38"
    assert by_header["S7 router CPU ms/req (real vLLM, streamed)"] == "2.50"
    assert by_header["S5 added p50 (ms), 1 in flight"] == "+0.1"


def test_the_headline_names_the_commit_of_each_scenario_and_a_dirty_tree() -> None:
    block = headline_block(sections())
    assert "S1: " in block and "commit aaaaaaa," in block
    assert "commit bbbbbbb+dirty," in block
    assert "commit ccccccc (tree not recorded)," in block


def test_only_figures_the_results_hold_are_shown() -> None:
    only_s1 = [s for s in sections() if s.key == "1"]
    table = headline_table(only_s1)
    assert all(h.startswith("S1 ") for h in table.headers[1:])
    assert [r[0] for r in table.rows] == ["**vllm-fleet cost (the default)**", "nginx least_conn"]
    nginx = table.rows[1]
    assert nginx[-1] == "3.25"  # S1 CPU; no other scenario, no invented cell


def test_splice_replaces_only_the_block_and_refuses_a_readme_without_markers() -> None:
    text = f"intro\n{START}\nold table\n{END}\noutro\n"
    assert splice(text, "new table") == f"intro\n{START}\nnew table\n{END}\noutro\n"
    with pytest.raises(ValueError, match="headline markers are missing"):
        splice("intro\n", "new table")


def test_findings_say_when_the_tables_moved_on() -> None:
    findings = "<!-- written for the results of commit aaaaaaa -->\nnotes"
    note = findings_note(findings, sections())
    assert "commit aaaaaaa" in note and "scenario 5 at bbbbbbb+dirty" in note
    assert "scenario 1" not in note
    assert findings_note(findings, sections()[:1]) == ""
    assert "do not say which results" in findings_note("notes", sections())
    two = findings_note("<!-- written for the results of commits aaaaaaa, bbbbbbb -->", sections())
    assert "commits aaaaaaa, bbbbbbb" in two and "scenario 7 at ccccccc" in two
    assert "scenario 5" not in two
    every = "<!-- written for the results of commits aaaaaaa,bbbbbbb, ccccccc -->\nnotes"
    assert findings_note(every, sections()) == ""
    page = render_page(sections(), "img/", findings)
    assert "<!-- written for" not in page and note in page


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo, check=True, capture_output=True,
    )  # fmt: skip


def test_the_stamp_is_head_and_only_code_changes_make_it_dirty(tmp_path: Path) -> None:
    assert current_stamp(tmp_path) == Stamp("", None)  # not a checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results" / "s1.json").write_text("{}\n")
    (tmp_path / "README.md").write_text("readme\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True
    ).stdout.strip()
    assert current_stamp(tmp_path) == Stamp(head, False)
    (tmp_path / "bench" / "results" / "s1.json").write_text('{"new": 1}\n')
    (tmp_path / "README.md").write_text("regenerated\n")
    assert current_stamp(tmp_path) == Stamp(head, False)  # outputs and prose
    (tmp_path / "new_module.py").write_text("y = 2\n")
    assert current_stamp(tmp_path) == Stamp(head, True)  # untracked code counts
    assert current_stamp(tmp_path).label == f"{head}+dirty"


def test_a_run_keeps_its_stamp_when_commits_are_made_while_it_lasts(tmp_path: Path) -> None:
    """The versions table names what the run measured, as the sections' stamps do, not the
    commit HEAD reached by the time a scenario asked (bench.peers.OursPeer.version)."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "one")
    first = run_stamp(tmp_path)
    (tmp_path / "notes.md").write_text("written while the run lasts\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "two")
    assert current_stamp(tmp_path).commit != first.commit
    assert run_stamp(tmp_path) == first


def test_a_run_stamps_every_stored_section_and_the_page(tmp_path: Path) -> None:
    async def tiny(opts: Options) -> Section:
        section = Section("9", "tiny")
        section.tables.append(Table(["router", "x"], [["ours cost", "1"]]))
        return section

    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{START}\n{END}\n")
    pages = Pages(tmp_path / "results", tmp_path / "page.md", tmp_path / "img", readme, None)
    opts = Options(quick=True, workdir=tmp_path / "work", python="python")
    code = Stamp("1234abc", True)
    assert run_scenarios([("9", tiny)], opts, pages, code) == 0
    (stored,) = load_sections(pages.results)
    assert (stored.commit, stored.dirty) == ("1234abc", True)
    assert stored.machine and "cores" in stored.machine[0]
    page = pages.page.read_text()
    assert "*Measured at commit 1234abc+dirty," in page
    assert "scenario 9:" in page and "1234abc+dirty" in page.split("## Machines and runs")[1]


def test_stored_sections_keep_their_stamp(tmp_path: Path) -> None:
    for section in sections():
        save_section(section, tmp_path)
    loaded = {s.key: s.stamp for s in load_sections(tmp_path)}
    assert loaded == {
        "1": Stamp("aaaaaaa", False),
        "5": Stamp("bbbbbbb", True),
        "7": Stamp("ccccccc", None),
    }


def test_results_written_before_the_flag_load_as_not_recorded(tmp_path: Path) -> None:
    (tmp_path / "s1.json").write_text(
        '{"key": "1", "title": "t", "text": [], "tables": [], "plots": [], "runs": [], '
        '"seconds": 1.0, "date": "d", "commit": "c4ff45e", "facts": {}, "versions": {}, '
        '"settings": {}}\n'
    )
    (section,) = load_sections(tmp_path)
    assert section.stamp.label == "c4ff45e (tree not recorded)"
    assert section.machine == []
