"""Running routers through a scenario: the options, one measured run per router, and what
every scenario keeps of its runs (`finish`)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import RequestRecord, RequestSpec, Target, run_open_loop
from bench.peers import Peer, PeerUnavailable, make_peer
from bench.replicas import Fleet, SimFleet, VllmFleet, find_vllm_python
from bench.section import PeerRun, Section
from bench.stats import shares

#: Model name every simulated replica serves.
MODEL = "sim-model"


@dataclass(frozen=True)
class Options:
    """How the whole benchmark runs (from the command line)."""

    quick: bool
    workdir: Path
    #: interpreter with vllm-fleet installed, for the simulators and our router.
    python: str
    seed: int = 1
    #: restrict every scenario to these peer keys (None = each scenario's own line-up).
    peers: tuple[str, ...] | None = None
    #: interpreter with vLLM installed (scenario 7); "" = look for one.
    vllm_python: str = ""
    #: runs one scenario can reuse from another in the same invocation: (peer key, load).
    reuse: dict[tuple[str, float], PeerRun] = field(default_factory=dict)


RunLoad = Callable[[Target, Peer], Awaitable[list[RequestRecord]]]


def line_up(opts: Options, default: Sequence[str], quick: Sequence[str]) -> list[str]:
    """The peers to run: --peers when given, else the scenario's full or quick line-up."""
    if opts.peers is not None:
        return list(opts.peers)
    return list(quick if opts.quick else default)


async def measure(key: str, opts: Options, fleet: Fleet, run: RunLoad) -> PeerRun:
    """Start one peer in front of `fleet`, run the load through it, stop it (always)."""
    peer = make_peer(key, opts.workdir / "peers", opts.python)
    result = PeerRun(key, peer.name, peer.settings, peer.version(), replica_urls=fleet.urls)
    try:
        await peer.start(fleet.urls)
    except PeerUnavailable as exc:
        result.unavailable = str(exc)
        print(f"  {peer.name}: NOT STARTED ({exc})", flush=True)
        return result
    try:
        await fleet.wait_idle()
        before = await fleet.received()
        await timed_run(peer, run, result)
        result.shares = shares(before, await fleet.received())
    finally:
        peer.stop()
    s = result.summary
    print(
        f"  {peer.name}: {s.requests} req, {s.errors} err, p50 {s.latency_p50:.2f}s "
        f"p99 {s.latency_p99:.2f}s, ttft p50 {1000 * s.ttft_p50:.0f}ms",
        flush=True,
    )
    return result


async def timed_run(peer: Peer, run: RunLoad, result: PeerRun) -> None:
    """One load through a started peer (its replicas idle): the records and the CPU the peer
    used meanwhile go into ``result``."""
    cpu_before = peer.cpu_seconds()
    result.records = await run(peer.target(), peer)
    cpu_after = peer.cpu_seconds()
    if cpu_before is not None and cpu_after is not None:
        result.cpu_s = cpu_after - cpu_before


def open_loop(schedule: list[RequestSpec], model: str = MODEL) -> RunLoad:
    async def run(target: Target, peer: Peer) -> list[RequestRecord]:
        return await run_open_loop(target, schedule, model)

    return run


@contextlib.asynccontextmanager
async def started(fleet: SimFleet | VllmFleet) -> AsyncIterator[None]:
    """Start the scenario's replicas; stop them however the block ends."""
    try:
        await fleet.start()
        yield
    finally:
        fleet.stop()


def finish(section: Section) -> Section:
    """Keep the numbers later summaries need (`facts`) and each router's version."""
    for run in section.runs:
        section.versions.setdefault(run.name, run.version)
        section.settings.setdefault(run.name, run.settings)
        if run.unavailable:
            continue
        s = run.summary
        name = run.name
        if "concurrency" in run.extra:
            name = f"{run.name} @{int(run.extra['concurrency'])}"
        section.facts[name] = {
            "latency_mean": s.latency_mean,
            "latency_p50": s.latency_p50,
            "latency_p99": s.latency_p99,
            "ttft_p50": s.ttft_p50,
            "ttft_p99": s.ttft_p99,
            "errors": float(s.errors),
            "requests": float(s.requests),
            "tokens_per_s": s.tokens_per_s,
            "requests_per_s": s.requests_per_s,
            "cpu_ms_per_request": run.cpu_ms_per_request,
            "last_replica_share": run.shares[-1] if run.shares else math.nan,
            # Scenario-specific figures (e.g. the replicas' prefix-cache hits and queries).
            **run.extra,
        }
    return section


async def tiny_vllm(opts: Options) -> tuple[str, Path] | str:
    """The interpreter with vLLM and the tiny model it built (scenarios 7 and 12), or why a
    real-vLLM scenario cannot run (a line for its section)."""
    python = opts.vllm_python or find_vllm_python(Path.cwd())
    if not python:
        return (
            "Not run: no interpreter with vLLM found (set BENCH_VLLM_PYTHON, or install the "
            "project's .venv with `bash .ci/install`)."
        )
    model_dir = opts.workdir / "tiny-model"
    # Built by the vLLM interpreter: it has the model builder's dependencies (tokenizers,
    # safetensors), which the bench venv does not need.
    build = await asyncio.create_subprocess_exec(
        python, "-m", "vllm_fleet.launcher.tiny_model", str(model_dir),
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    if await build.wait() != 0:
        return f"Not run: `{python} -m vllm_fleet.launcher.tiny_model` failed."
    return python, model_dir
