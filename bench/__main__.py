"""`python -m bench [--quick] [--scenarios 1,5] [--peers ours-lb,nginx-lc]` runs scenarios;
`python -m bench report [--check]` rebuilds docs/benchmarks.md and the README's headline block
from bench/results without running anything.

Runs from its own venv (bench/.env, made by bench/setup.sh): the first start installs it and
re-executes this module there, so the Rust routers and matplotlib never enter the project's venv.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from bench.cpu import machine_busy_seconds, own_cpu_seconds
from bench.page import Pages, machine, stale, write
from bench.section import Section
from bench.stamp import Stamp, run_stamp
from bench.store import save_section

if TYPE_CHECKING:
    from bench.scenarios import Options, Scenario

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
ENV_PYTHON = BENCH_DIR / ".env" / "bin" / "python"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Compare vllm-fleet's router with nginx, HAProxy, vllm-router, "
        "sglang-router and client-side baselines; store bench/results, write "
        "docs/benchmarks.md and the README's headline table.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs, fewer routers (default scenarios 1,5)"
    )
    parser.add_argument(
        "--scenarios",
        default="",
        help="comma-separated, e.g. 1,5 (default 1-6 of 1-12; 7, 11 and 12 use real vLLM)",
    )
    parser.add_argument("--peers", default="", help="comma-separated peer keys (default: each "
                        "scenario's line-up); see bench/peers.py PEER_KEYS")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-setup", action="store_true", help="skip bench/setup.sh")
    parser.add_argument("--output", type=Path, help="markdown file to write")
    return parser.parse_args(argv)


def parse_report_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench report",
        description="Rebuild docs/benchmarks.md and the README's headline block from "
        "bench/results (no benchmark runs; any interpreter with the project works).",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 naming each file that differs from what the results give",
    )
    return parser.parse_args(argv)


def full_pages() -> Pages:
    """The published files: bench/results -> docs/benchmarks.md (+ docs/img) and README.md."""
    return Pages(
        results=BENCH_DIR / "results",
        page=REPO / "docs" / "benchmarks.md",
        images=REPO / "docs" / "img",
        readme=REPO / "README.md",
        findings=BENCH_DIR / "findings.md",
    )


def report(argv: list[str]) -> int:
    """`python -m bench report [--check]`."""
    args = parse_report_args(argv)
    pages = full_pages()
    try:
        if args.check:
            differ = stale(pages)
            for path in differ:
                print(
                    f"bench: {path.relative_to(REPO)} differs from what bench/results give; "
                    "run `python -m bench report`",
                    file=sys.stderr,
                )
            return 1 if differ else 0
        changed = write(pages)
    except ValueError as exc:  # the README lost its markers
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    for path in changed:
        print(f"bench: wrote {path.relative_to(REPO)}", flush=True)
    if not changed:
        print("bench: docs/benchmarks.md and README.md already match bench/results", flush=True)
    return 0


def ensure_env(args: argparse.Namespace, argv: list[str]) -> None:
    """Install bench/.env if needed and re-run there (once)."""
    if Path(sys.prefix).resolve() == (BENCH_DIR / ".env").resolve():
        return
    if not args.no_setup:
        subprocess.run(["bash", str(BENCH_DIR / "setup.sh")], check=False)
    if ENV_PYTHON.exists():
        os.execv(str(ENV_PYTHON), [str(ENV_PYTHON), "-m", "bench", *argv])
    print("bench: bench/.env is missing; running from this interpreter", file=sys.stderr)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: children get stopped


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report(argv[1:])
    args = parse_args(argv)
    os.chdir(REPO)
    ensure_env(args, argv)
    signal.signal(signal.SIGTERM, _terminate)
    # Imported here, not for `report`: the scenarios import the simulator and the replicas.
    from bench.scenarios import FULL_DEFAULT, QUICK_DEFAULT, SCENARIOS, Options

    default = list(QUICK_DEFAULT if args.quick else FULL_DEFAULT)
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()] or default
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown:
        print(f"bench: unknown scenario {unknown}; use {','.join(SCENARIOS)}", file=sys.stderr)
        return 2
    from bench.peers import PEER_KEYS

    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    wrong = [p for p in peers if p not in PEER_KEYS]
    if wrong:
        print(f"bench: --peers: unknown {wrong}; use {','.join(PEER_KEYS)}", file=sys.stderr)
        return 2
    # Taken once, before this run writes anything: its own results must not make the tree dirty.
    code = run_stamp(REPO)
    if code.dirty:
        print(f"bench: the tree has uncommitted changes; results are stamped {code.label}")
    workdir = BENCH_DIR / ".work" / time.strftime("%Y%m%d-%H%M%S")
    if args.quick:
        pages = Pages(
            results=BENCH_DIR / ".work" / "results-quick",
            page=args.output or BENCH_DIR / ".work" / "benchmarks-quick.md",
            images=BENCH_DIR / ".work" / "img",
            readme=None,
            findings=None,
        )
    else:
        pages = full_pages()
        if args.output:
            pages = replace(pages, page=args.output, readme=None)
    opts = Options(
        quick=args.quick,
        workdir=workdir,
        python=sys.executable,
        seed=args.seed,
        peers=peers or None,
    )
    return run_scenarios([(key, SCENARIOS[key]) for key in keys], opts, pages, code)


def run_scenarios(
    scenarios: Sequence[tuple[str, Scenario]], opts: Options, pages: Pages, code: Stamp
) -> int:
    """Run each scenario; store its section stamped with `code`, then rebuild the pages."""
    from bench.scenarios import finish

    mode = "quick" if opts.quick else "full"
    started = time.monotonic()
    for key, scenario in scenarios:
        print(f"bench: scenario {key} ({mode})", flush=True)
        t = time.monotonic()
        busy, own = machine_busy_seconds(), own_cpu_seconds()
        try:
            section = finish(asyncio.run(scenario(opts)))
        except KeyboardInterrupt:
            print("bench: interrupted; every started process was stopped", file=sys.stderr)
            return 130
        except Exception as exc:
            traceback.print_exc()
            section = Section(key, f"(failed: {type(exc).__name__})", [f"The run failed: {exc}"])
        section.seconds = time.monotonic() - t
        section.date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        section.commit, section.dirty = code.commit, code.dirty
        section.machine = machine()
        section.text.append(contention(section.seconds, busy, own))
        section.plots = [
            replace(plot, title=f"{plot.title} (commit {code.label})") for plot in section.plots
        ]
        if section.plots:
            from bench import plots  # only the bench venv is sure to have matplotlib

            for plot in section.plots:
                plots.draw(plot, pages.images)
        save_section(section, pages.results)
        write(pages)
        print(f"bench: scenario {key} done in {section.seconds:.0f} s", flush=True)
    print(f"bench: wrote {pages.page} in {time.monotonic() - started:.0f} s", flush=True)
    return 0


def contention(seconds: float, busy_before: float, own_before: float) -> str:
    """How much of the machine the benchmark had: other programs' CPU skews every number."""
    capacity = seconds * (os.cpu_count() or 1)
    own = own_cpu_seconds() - own_before
    other = max(0.0, machine_busy_seconds() - busy_before - own)
    return (
        f"While this scenario ran ({seconds:.0f} s), the benchmark's processes used "
        f"{own / capacity:.0%} of the machine's CPU and other programs {other / capacity:.0%}."
    )


if __name__ == "__main__":
    sys.exit(main())
