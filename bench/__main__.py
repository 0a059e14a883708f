"""`python -m bench [--quick] [--scenarios 1,5] [--peers ours-lb,nginx-lc]`.

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
from pathlib import Path
from types import FrameType

from bench.procs import machine_busy_seconds, own_cpu_seconds

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
ENV_PYTHON = BENCH_DIR / ".env" / "bin" / "python"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Compare vllm-fleet's router with nginx, HAProxy, vllm-router, "
        "sglang-router and client-side baselines; write docs/benchmarks.md.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs, fewer routers (default scenarios 1,5)"
    )
    parser.add_argument(
        "--scenarios", default="", help="comma-separated, e.g. 1,5 (default 1-6; 7 = real vLLM)"
    )
    parser.add_argument("--peers", default="", help="comma-separated peer keys (default: each "
                        "scenario's line-up); see bench/peers.py PEER_KEYS")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-setup", action="store_true", help="skip bench/setup.sh")
    parser.add_argument("--output", type=Path, help="markdown file to write")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rebuild the page from stored results (after editing bench/findings.md)",
    )
    return parser.parse_args(argv)


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
    args = parse_args(argv)
    os.chdir(REPO)
    ensure_env(args, argv)
    signal.signal(signal.SIGTERM, _terminate)
    # Imported here: only the bench venv is sure to have matplotlib.
    from bench import report
    from bench.scenarios import FULL_DEFAULT, QUICK_DEFAULT, SCENARIOS, Options, finish
    from bench.section import Section

    default = list(QUICK_DEFAULT if args.quick else FULL_DEFAULT)
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()] or default
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown:
        print(f"bench: unknown scenario {unknown}; use {','.join(SCENARIOS)}", file=sys.stderr)
        return 2
    mode = "quick" if args.quick else "full"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = BENCH_DIR / ".work" / stamp
    if args.quick:
        results, images = BENCH_DIR / ".work" / "results-quick", BENCH_DIR / ".work" / "img"
        output = args.output or BENCH_DIR / ".work" / "benchmarks-quick.md"
    else:
        results, images = BENCH_DIR / "results", REPO / "docs" / "img"
        output = args.output or REPO / "docs" / "benchmarks.md"
    opts = Options(
        quick=args.quick,
        workdir=workdir,
        python=sys.executable,
        seed=args.seed,
        peers=tuple(p for p in args.peers.split(",") if p) or None,
    )
    if args.render_only:
        write_page(results, output, images, mode, args.seed)
        print(f"bench: wrote {output} from {results}", flush=True)
        return 0
    started = time.monotonic()
    for key in keys:
        print(f"bench: scenario {key} ({mode})", flush=True)
        t = time.monotonic()
        busy, own = machine_busy_seconds(), own_cpu_seconds()
        try:
            section = finish(asyncio.run(SCENARIOS[key](opts)))
        except KeyboardInterrupt:
            print("bench: interrupted; every started process was stopped", file=sys.stderr)
            return 130
        except Exception as exc:
            traceback.print_exc()
            section = Section(key, f"(failed: {type(exc).__name__})", [f"The run failed: {exc}"])
        section.seconds = time.monotonic() - t
        section.date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        section.commit = git_commit()
        section.text.append(contention(section.seconds, busy, own))
        for plot in section.plots:
            report.draw(plot, images)
        report.save_section(section, results)
        write_page(results, output, images, mode, args.seed)
        print(f"bench: scenario {key} done in {section.seconds:.0f} s", flush=True)
    print(f"bench: wrote {output} in {time.monotonic() - started:.0f} s", flush=True)
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


def git_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()


def write_page(results: Path, output: Path, images: Path, mode: str, seed: int) -> None:
    from bench import report as rep

    sections = rep.load_sections(results)
    meta = {
        "mode": mode,
        "seed": f"{seed} (arrivals, lengths, prompts; same sequence for every router)",
        "runs": "; ".join(
            f"scenario {s.key}: {s.date or '?'}, commit {s.commit or '?'}, {s.seconds:.0f} s"
            for s in sections
        ),
    }
    prefix = os.path.relpath(images, output.parent) + "/"
    output.parent.mkdir(parents=True, exist_ok=True)
    findings = BENCH_DIR / "findings.md"
    text = findings.read_text() if findings.exists() and mode == "full" else ""
    output.write_text(rep.render_page(sections, meta, prefix, text))


if __name__ == "__main__":
    sys.exit(main())
