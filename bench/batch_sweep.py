"""Batch throughput: `vllm-fleet batch --max-inflight auto` against a sweep of fixed limits.

    python -m bench.batch_sweep [--requests 400] [--out bench/.work/batch_sweep.json]

A helper rather than a numbered scenario: it measures the batch client, not a line-up of
routers. Two simulated replicas (max_num_seqs 16, 20 ms step growing 5 % a running request:
the default calibrated shape) behind our router (a child process, like the simulators); each
run is the real CLI in its own process on its own copy of one seeded file (max_tokens 16-64;
the prompts tagged by run, so no run reuses another's prefix cache), reporting
output tokens/s from its --json summary. Auto runs twice: first against the fresh router
(no batch limit learned yet: slow start probes) and again last (the router has seen full
batches). Throughput against concurrency is the curve seed notebook 003 draws for batch size.
``--vllm`` runs the same against two real vLLM CPU replicas of the tiny model instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.replicas import (
    TINY_MODEL,
    SimFleet,
    SimSettings,
    VllmFleet,
    VllmReplica,
    find_vllm_python,
)
from bench.stamp import current_stamp
from tests.support.batch import run_batch_command
from tests.support.ports import free_port
from tests.support.procs import ChildProcess, wait_http

REPO = Path(__file__).resolve().parents[1]
MODEL = "sim-model"
FIXED = (8, 16, 32, 48, 64, 128)
#: Where results go, by fleet (real vLLM or not); `python -m bench.batch_plot` draws them.
RESULTS = {False: "batch_sweep.json", True: "batch_sweep_vllm.json"}
REPLICA = SimSettings(model=MODEL, max_num_seqs=16, step_ms=20.0)


def write_input(
    path: Path, count: int, seed: int = 3, model: str = MODEL, run: int | None = None
) -> None:
    """A seeded batch file. ``run`` tags every prompt at its start: runs of a sweep then share
    no prefix, so no run finds its prompts in the engines' prefix cache from an earlier one."""
    rng = random.Random(seed)
    tag = "" if run is None else f"run {run:02d}: "
    with path.open("w") as handle:
        for n in range(count):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": tag + f"summarise document {n} " * 8}],
                "max_tokens": rng.randint(16, 64),
                "ignore_eos": True,  # real vLLM: every answer runs to max_tokens, as the sim's
            }
            line = {"custom_id": f"doc-{n}", "method": "POST", "url": "/v1/chat/completions"}
            handle.write(json.dumps({**line, "body": body}) + "\n")


def run_batch_cli(source: Path, workdir: Path, endpoint: str, limit: str) -> dict[str, Any]:
    output = workdir / f"out-{limit}-{time.monotonic_ns()}.jsonl"
    done = run_batch_command(source, output, endpoint, "--max-inflight", limit)
    if done.returncode != 0:
        raise RuntimeError(f"batch --max-inflight {limit} failed: {done.stderr[-1000:]}")
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


async def vllm_fleet(workdir: Path) -> VllmFleet:
    """Two real vLLM CPU replicas of the tiny random-weight model (as scenario 7 starts them)."""
    python = find_vllm_python(REPO)
    if not python:
        raise RuntimeError("no interpreter with vLLM found (set BENCH_VLLM_PYTHON)")
    model_dir = workdir / "tiny-model"
    build = [python, "-m", "vllm_fleet.launcher.tiny_model", str(model_dir)]
    await asyncio.to_thread(subprocess.run, build, check=True, stdout=subprocess.DEVNULL)
    return VllmFleet([VllmReplica(model_dir, python, 2, workdir) for _ in range(2)])


async def sweep(
    requests: int,
    workdir: Path,
    limits: tuple[str, ...] = ("auto", *map(str, FIXED), "auto"),
    real_vllm: bool = False,
) -> list[dict[str, Any]]:
    fleet: SimFleet | VllmFleet
    if real_vllm:
        fleet = await vllm_fleet(workdir)
    else:
        fleet = SimFleet.of([REPLICA, REPLICA], workdir, sys.executable)
    await fleet.start()
    port = free_port()
    router_argv = [sys.executable, "-m", "vllm_fleet.launcher.cli", "router", "--host", "127.0.0.1"]
    router_argv += ["--port", str(port), "--log-level", "warning"]
    for url in fleet.urls:
        router_argv += ["--backend", url]
    router = ChildProcess(router_argv, workdir / "router.log", cwd=REPO)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{endpoint}/ready", 30.0, router)
        rows: list[dict[str, Any]] = []
        for run, limit in enumerate(limits):
            # A file of its own per run: the same prompts again would hit the prefix cache the
            # first run filled, and every run but the first would be measured with a head start
            # (the first run's -4 % on the simulator, in the sweeps before 2026-12-03).
            source = workdir / f"input-{run}.jsonl"
            write_input(source, requests, model=TINY_MODEL if real_vllm else MODEL, run=run)
            label = "auto (fresh router)" if limit == "auto" and not rows else limit
            summary = await asyncio.to_thread(run_batch_cli, source, workdir, endpoint, limit)
            row = {
                "max_inflight": label,
                "output_tokens_per_s": summary["output_tokens_per_s"],
                "requests_per_s": summary["requests_per_s"],
                "latency_p50_s": summary["latency_p50_s"],
                "latency_p99_s": summary["latency_p99_s"],
                "final_limit": summary["final_limit"],
                "duration_s": summary["duration_s"],
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        router.stop()
        fleet.stop()


def table(rows: list[dict[str, Any]]) -> str:
    best = max(r["output_tokens_per_s"] for r in rows if not str(r["max_inflight"]).startswith("a"))
    lines = [
        "| --max-inflight | output tok/s | vs best fixed | p50 s | p99 s | final limit |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['max_inflight']} | {r['output_tokens_per_s']:.0f} | "
            f"{100 * r['output_tokens_per_s'] / best:.0f} % | {r['latency_p50_s']:.2f} | "
            f"{r['latency_p99_s']:.2f} | {r['final_limit']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument(
        "--limits",
        default=",".join(("auto", *map(str, FIXED), "auto")),
        help="comma-separated --max-inflight values, in order (default: the whole sweep)",
    )
    parser.add_argument(
        "--vllm", action="store_true", help="two real vLLM CPU replicas of the tiny model"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default: bench/results/...)"
    )
    args = parser.parse_args()
    stamp = current_stamp(REPO)
    with tempfile.TemporaryDirectory() as tmp:
        limits = tuple(args.limits.split(","))
        rows = asyncio.run(sweep(args.requests, Path(tmp), limits, args.vllm))
    out = args.out or REPO / "bench" / "results" / RESULTS[args.vllm]
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "commit": stamp.label,
        "fleet": "2 real vLLM CPU replicas (tiny model)" if args.vllm else "2 simulated replicas",
        "requests": args.requests,
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
