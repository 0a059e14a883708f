"""Scenario 11: `vllm-fleet batch`, its throughput and what it costs live traffic.

Three measurements, each on its own fleet:

1. Interactive TTFT with a batch running through the same router: two simulated replicas
   started with ``--scheduling-policy priority``; the same seeded interactive load (streamed
   chats) alone, then again while `vllm-fleet batch --max-inflight auto` runs a large file
   through the same router (vllm_fleet.router.priority keeps slots free for interactive
   requests; the engines order their queue by the batch's low ``priority``). Target: TTFT p99
   with the batch within 1.5 x of alone (issue 19).
2. Throughput against concurrency (bench.batch_sweep's fleet: two simulated replicas,
   max_num_seqs 16, behind our router): `--max-inflight auto` (fresh router, and again warm)
   against fixed limits, and a hand-written pool of 16 threads posting the same lines.
3. `vllm run-batch` on one real vLLM CPU replica of the tiny model against `vllm-fleet batch`
   over one such replica (the same hardware) and over two, behind our router, on the same file
   (skipped without vLLM).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import os
import re
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from bench.batch_sweep import sweep, write_input
from bench.load import FixedTarget, RequestMix, RequestRecord, make_schedule, run_open_loop
from bench.replicas import (
    TINY_MODEL,
    SimFleet,
    SimSettings,
    VllmFleet,
    VllmReplica,
    find_vllm_python,
)
from bench.scenarios.harness import MODEL, Options, started
from bench.section import Plot, Section, Table
from bench.stats import summarize
from tests.support.batch import batch_argv
from tests.support.ports import free_port, free_port_run
from tests.support.procs import ChildProcess, wait_http
from vllm_fleet.launcher.commands.demo import tiny_cpu_plan
from vllm_fleet.launcher.vllm_args import run_batch_command

KEY = "11"
#: No line-up of routers: it measures the batch client through our router (started here).
PEERS: tuple[str, ...] = ()
QUICK_PEERS: tuple[str, ...] = ()
REPO = Path(__file__).resolve().parents[2]
PRIORITY_REPLICA = SimSettings(
    model=MODEL, max_num_seqs=16, step_ms=20.0, scheduling_policy="priority"
)
#: Interactive chats: all streamed (TTFT is measured on streams), 16-64 tokens.
INTERACTIVE = RequestMix(
    rate=3.0, duration=30.0, long_fraction=0.0, prompt_words=(16, 128), stream_fraction=1.0
)
#: Lines in the batch that runs beside the interactive load (it never runs dry).
BACKGROUND_LINES = 20_000
SWEEP_LIMITS = ("auto", "8", "16", "32", "64", "128", "auto")
QUICK_SWEEP_LIMITS = ("auto", "8", "32", "128", "auto")
POOL_THREADS = 16
#: Enough that the engines' steady throughput, not the first second, sets the figure (at 100
#: lines `vllm-fleet batch` spent most of its 2.9 s in slow start).
RUN_BATCH_LINES = 1000
TTFT_TARGET = 1.5


@contextlib.asynccontextmanager
async def our_router(python: str, urls: Sequence[str], workdir: Path) -> AsyncIterator[str]:
    """Our router (default policy) in front of ``urls``, as a child process; its URL."""
    port = free_port()
    argv = [python, "-m", "vllm_fleet.launcher.cli", "router", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--log-level", "warning"]
    for url in urls:
        argv += ["--backend", url]
    router = ChildProcess(argv, workdir / f"router-{port}.log", cwd=REPO)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{endpoint}/ready", 30.0, router)
        yield endpoint
    finally:
        router.stop()


async def _limits_learned(endpoint: str, batch: ChildProcess, deadline_s: float) -> bool:
    """Poll the router until it knows a batch limit (one is enough: a replica not learned yet
    takes the fleet's, router.priority)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline and batch.alive():
            async with session.get(f"{endpoint}/fleet/replicas") as response:
                rows = await response.json()
            if any((r.get("speed") or {}).get("batch_limit") for r in rows):
                return True
            await asyncio.sleep(0.5)
    return False


def _summary_line(log: Path) -> dict[str, Any]:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            summary: dict[str, Any] = json.loads(line)
            return summary
    return {}


async def interactive_with_batch(
    opts: Options, workdir: Path
) -> tuple[list[RequestRecord], list[RequestRecord], dict[str, Any]]:
    """(interactive alone, interactive with the batch, the batch's summary)."""
    mix = replace(INTERACTIVE, seed=opts.seed, duration=15.0 if opts.quick else 30.0)
    schedule = make_schedule(mix)
    fleet = SimFleet.of([PRIORITY_REPLICA, PRIORITY_REPLICA], workdir, opts.python)
    async with started(fleet), our_router(opts.python, fleet.urls, workdir) as endpoint:
        alone = await run_open_loop(FixedTarget(endpoint), schedule, MODEL)
        source = workdir / "background.jsonl"
        write_input(source, BACKGROUND_LINES, seed=opts.seed)
        # Teach the router the replicas' batch limits first (the rule needs them): a short
        # batch at twice the fleet's slots makes both queue for sure.
        lesson = workdir / "teach.jsonl"
        write_input(lesson, 300, seed=opts.seed + 1)
        teach = batch_argv(lesson, workdir / "teach-out.jsonl", endpoint, "--max-inflight", "64")
        teach[0] = opts.python
        await asyncio.to_thread(subprocess.run, teach, capture_output=True, timeout=300)
        output = workdir / "background-out.jsonl"
        argv = batch_argv(source, output, endpoint, "--max-inflight", "auto")
        argv[0] = opts.python
        log = workdir / "background-batch.log"
        batch = ChildProcess(argv, log, cwd=REPO)
        try:
            if not await _limits_learned(endpoint, batch, 60.0):
                raise RuntimeError(f"the router never learned a batch limit: {batch.tail()}")
            with_batch = await run_open_loop(FixedTarget(endpoint), schedule, MODEL)
        finally:
            batch.stop(grace=15.0)
        for label, records in (("alone", alone), ("with batch", with_batch)):
            s = summarize(records)
            ttft = f"TTFT p50 {1000 * s.ttft_p50:.0f} ms p99 {1000 * s.ttft_p99:.0f} ms"
            print(f"  interactive {label}: {s.requests} req, {s.errors} err, {ttft}", flush=True)
        return alone, with_batch, _summary_line(log)


def _post(endpoint: str, line: str) -> int:
    """One batch line as a plain thread-pool client sends it: POST, read, count tokens."""
    item = json.loads(line)
    request = urllib.request.Request(
        f"{endpoint}{item['url']}",
        data=json.dumps(item["body"]).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        body = json.loads(response.read())
    return int(body.get("usage", {}).get("completion_tokens", 0))


def thread_pool(source: Path, endpoint: str, threads: int) -> dict[str, Any]:
    """The hand-written baseline: a fixed pool of threads posting every line, no retries."""
    lines = source.read_text().splitlines()
    started_at = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        tokens = sum(pool.map(lambda line: _post(endpoint, line), lines))
    duration = time.monotonic() - started_at
    return {
        "max_inflight": f"thread pool of {threads}",
        "output_tokens_per_s": tokens / duration,
        "requests_per_s": len(lines) / duration,
        "duration_s": duration,
        "final_limit": threads,
    }


async def throughput_sweep(opts: Options, workdir: Path) -> list[dict[str, Any]]:
    limits = QUICK_SWEEP_LIMITS if opts.quick else SWEEP_LIMITS
    requests = 100 if opts.quick else 200
    (workdir / "sweep").mkdir(parents=True, exist_ok=True)
    rows = await sweep(requests, workdir / "sweep", limits)
    fleet = SimFleet.of([SimSettings(model=MODEL)] * 2, workdir / "pool", opts.python)
    async with started(fleet), our_router(opts.python, fleet.urls, workdir) as endpoint:
        source = workdir / "pool-input.jsonl"
        write_input(source, requests)
        rows.append(await asyncio.to_thread(thread_pool, source, endpoint, POOL_THREADS))
    return rows


def _run_batch_command(
    python: str, model_dir: Path, source: Path, output: Path
) -> tuple[list[str], dict[str, str]]:
    """`vllm run-batch` for the engine the planner gives one tiny CPU replica, and its
    environment (vllm_args.run_batch_command: the one builder of vLLM command lines)."""
    spec = tiny_cpu_plan(str(model_dir), replicas=1, base_port=free_port_run(1), python=python,
                         cpus=os.cpu_count() or 1).replicas[0]  # fmt: skip
    argv = run_batch_command(spec.command, str(source), str(output))
    return list(argv), {**os.environ, **spec.env}


#: vllm run-batch's tqdm bar when done: "Running batch: 100% Completed | 8/8 [00:00<00:00,
#: 22.27req/s]": requests and their rate.
_DONE_BAR = re.compile(r"Running batch: 100%[^|]*\|\s*(\d+)/\d+ \[[^,]*,\s*([\d.]+)req/s")


def _progress_seconds(log: str) -> float:
    """Seconds run-batch's own progress bar says the requests took (requests / its rate; its
    engine start is not in them); NaN when the bar is missing."""
    found = _DONE_BAR.findall(log)
    if not found:
        return math.nan
    count, rate = found[-1]
    return int(count) / float(rate) if float(rate) > 0 else math.nan


async def run_batch_comparison(opts: Options, workdir: Path) -> dict[str, Any] | str:
    """vLLM's run-batch on one replica against ours on two; a reason string when not run."""
    python = opts.vllm_python or find_vllm_python(REPO)
    if not python:
        return "no interpreter with vLLM found (set BENCH_VLLM_PYTHON)"
    model_dir = workdir / "tiny-model"
    build = [python, "-m", "vllm_fleet.launcher.tiny_model", str(model_dir)]
    await asyncio.to_thread(subprocess.run, build, check=True, stdout=subprocess.DEVNULL)
    source = workdir / "run-batch.jsonl"
    write_input(source, RUN_BATCH_LINES, seed=opts.seed, model=TINY_MODEL)
    argv, env = _run_batch_command(python, model_dir, source, workdir / "run-batch-out.jsonl")
    started_at = time.monotonic()
    done = await asyncio.to_thread(
        subprocess.run, argv, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    run_batch_s = time.monotonic() - started_at
    (workdir / "run-batch.log").write_text(done.stdout + done.stderr)
    run_batch_generation_s = _progress_seconds(done.stdout + done.stderr)
    if done.returncode != 0:
        return f"vllm run-batch failed: {done.stderr[-300:]}"
    out_lines = (workdir / "run-batch-out.jsonl").read_text().splitlines()
    tokens = sum(
        int(((json.loads(x).get("response") or {}).get("body") or {}).get("usage", {})
            .get("completion_tokens", 0))
        for x in out_lines
    )  # fmt: skip
    result: dict[str, Any] = {
        "run_batch_s": run_batch_s,
        "run_batch_generation_s": run_batch_generation_s,
        "run_batch_tokens": tokens,
        "run_batch_lines": len(out_lines),
    }
    for replicas in (1, 2):
        ours = await _ours_on_vllm(opts, python, model_dir, source, workdir, replicas)
        if isinstance(ours, str):
            return ours
        result[f"ours{replicas}"] = ours
    return result


async def _ours_on_vllm(
    opts: Options, python: str, model_dir: Path, source: Path, workdir: Path, replicas: int
) -> dict[str, Any] | str:
    """`vllm-fleet batch --max-inflight auto` through our router over ``replicas`` fresh real
    vLLM replicas: its --json summary plus how long one replica took to become healthy."""
    fleet = VllmFleet([VllmReplica(model_dir, python, 2, workdir) for _ in range(replicas)])
    started_at = time.monotonic()
    async with started(fleet):
        start_s = time.monotonic() - started_at
        async with our_router(opts.python, fleet.urls, workdir) as endpoint:
            output = workdir / f"fleet-out-{replicas}.jsonl"
            argv = batch_argv(source, output, endpoint, "--max-inflight", "auto")
            argv[0] = opts.python
            done = await asyncio.to_thread(
                subprocess.run, argv, capture_output=True, text=True, timeout=900, check=False
            )
    if done.returncode != 0:
        return f"vllm-fleet batch over {replicas} failed: {done.stderr[-300:]}"
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    summary["replica_start_s"] = start_s
    return summary


def _ttft_table(alone: list[RequestRecord], with_batch: list[RequestRecord]) -> Table:
    rows = []
    base = summarize(alone)
    for label, records in (("interactive alone", alone), ("with the batch", with_batch)):
        s = summarize(records)
        rows.append([
            label, str(s.requests), str(s.errors), f"{1000 * s.ttft_p50:.0f}",
            f"{1000 * s.ttft_p99:.0f}", f"{s.ttft_p99 / base.ttft_p99:.2f}",
            f"{s.latency_p99:.2f}",
        ])  # fmt: skip
    return Table(
        ["run", "requests", "errors", "TTFT p50 ms", "TTFT p99 ms", "TTFT p99 / alone",
         "latency p99 s"],
        rows,
        "Interactive load alone and with a batch through the same router",
    )  # fmt: skip


def _sweep_table(rows: list[dict[str, Any]]) -> Table:
    fixed = [r for r in rows if str(r["max_inflight"]).isdigit()]
    best = max(r["output_tokens_per_s"] for r in fixed)
    return Table(
        ["--max-inflight", "output tok/s", "vs best fixed", "in flight at the end"],
        [
            [
                str(r["max_inflight"]),
                f"{r['output_tokens_per_s']:.0f}",
                f"{100 * r['output_tokens_per_s'] / best:.0f} %",
                str(r["final_limit"]),
            ]
            for r in rows
        ],
        "Batch throughput against concurrency (2 simulated replicas, max_num_seqs 16)",
    )


def _sweep_plot(rows: list[dict[str, Any]]) -> Plot:
    fixed = sorted((int(r["max_inflight"]), r) for r in rows if str(r["max_inflight"]).isdigit())
    series = {"fixed --max-inflight": [(float(x), r["output_tokens_per_s"]) for x, r in fixed]}
    for r in rows:
        if not str(r["max_inflight"]).isdigit():
            series[str(r["max_inflight"])] = [(float(r["final_limit"]), r["output_tokens_per_s"])]
    return Plot(
        kind="sweep",
        filename="s11_batch_throughput.png",
        title="vllm-fleet batch: output tokens/s against requests in flight",
        series=series,
        xlabel="requests in flight (auto: where it ended)",
        ylabel="output tokens/s",
    )


async def run_scenario(opts: Options) -> Section:
    section = Section(KEY, "Batch jobs: throughput, and interactive TTFT beside a batch")
    workdir = opts.workdir / "s11"
    for part in ("ttft", "sweep", "run-batch"):
        (workdir / part).mkdir(parents=True, exist_ok=True)
    alone, with_batch, background = await interactive_with_batch(opts, workdir / "ttft")
    ratio = summarize(with_batch).ttft_p99 / summarize(alone).ttft_p99
    section.text.append(
        "Two simulated replicas (max_num_seqs 16, 20 ms steps) started with "
        "`--scheduling-policy priority`, behind our router. Interactive traffic: Poisson "
        f"arrivals at {INTERACTIVE.rate:g} req/s of streamed chats (16-64 tokens), seed "
        f"{opts.seed}, once alone and once while `vllm-fleet batch --max-inflight auto` runs "
        f"a {BACKGROUND_LINES}-line file (16-64 tokens each) through the same router, started "
        "after a short batch at 64 in flight had taught the router the replicas' batch limits "
        "(router.priority's reserve needs them). The batch ran at "
        f"{background.get('output_tokens_per_s', float('nan')):.0f} output tok/s over its "
        f"life. TTFT p99 with the batch: x{ratio:.2f} of alone (target <= {TTFT_TARGET})."
    )
    section.tables.append(_ttft_table(alone, with_batch))
    section.facts["interactive alone"] = {"ttft_p99": summarize(alone).ttft_p99}
    section.facts["interactive with batch"] = {
        "ttft_p99": summarize(with_batch).ttft_p99,
        "ttft_p99_ratio": ratio,
        "batch_tokens_per_s": float(background.get("output_tokens_per_s", float("nan"))),
    }
    rows = await throughput_sweep(opts, workdir / "sweep")
    section.tables.append(_sweep_table(rows))
    section.plots.append(_sweep_plot(rows))
    section.text.append(
        "Throughput: each run is the real CLI on its own copy of the seeded file (prompts "
        "tagged by run, so no run finds what an earlier one left in the prefix cache) against "
        "a fresh fleet of two simulated replicas (default fcfs scheduling) behind our router; "
        "`auto` runs "
        "first (fresh router: its slow start probes) and again last (the router knows the "
        f"batch limits). The thread pool is {POOL_THREADS} Python threads posting the lines "
        "with urllib, no retries: what users write by hand."
    )
    try:
        comparison = await run_batch_comparison(opts, workdir / "run-batch")
    except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
        comparison = f"{type(exc).__name__}: {exc}"
    if isinstance(comparison, str):
        section.text.append(f"`vllm run-batch` comparison not run: {comparison}.")
    else:
        rb_tokens, rb_s = comparison["run_batch_tokens"], comparison["run_batch_s"]
        rb_gen = comparison["run_batch_generation_s"]
        rb_rate = f"{rb_tokens / rb_gen:.0f} (whole run {rb_tokens / rb_s:.0f})"
        clients = [["vllm run-batch, 1 replica", f"{rb_s:.1f}", f"{rb_gen:.1f}", rb_rate]]
        for replicas in (1, 2):
            ours = comparison[f"ours{replicas}"]
            wall = ours["replica_start_s"] + ours["duration_s"]
            clients.append(
                [
                    f"vllm-fleet batch (auto), {replicas} replica{'s' * (replicas > 1)} "
                    "behind our router",
                    f"{wall:.1f}",
                    f"{ours['duration_s']:.1f}",
                    f"{ours['output_tokens_per_s']:.0f}",
                ]
            )
        section.tables.append(
            Table(
                ["client", "wall s (engine start included)", "requests s", "output tok/s"],
                clients,
                f"vllm run-batch against vllm-fleet batch ({RUN_BATCH_LINES} requests, real "
                "vLLM CPU, tiny model)",
            )
        )
        one, two = comparison["ours1"], comparison["ours2"]
        section.text.append(
            "`vllm run-batch` loads its engine inside the run and serves the file in-process; "
            "`vllm-fleet batch` posts each line over HTTP to our router, which sends it to a "
            "vLLM API server. Wall time counts the engines' start-up for both (ours: the "
            "fleet's replicas start together, then the batch runs); requests s is what "
            "run-batch's own progress bar says the requests took, against ours from first send "
            "to last answer. Lines answered: run-batch "
            f"{comparison['run_batch_lines']}, ours {one['succeeded']} over one replica and "
            f"{two['succeeded']} over two, on {os.cpu_count()} shared CPU cores: two replicas "
            "split the same cores, so two add no hardware here; a fleet on separate GPUs is "
            "where they would."
        )
    return section
