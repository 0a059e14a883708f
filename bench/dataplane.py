"""The router's CPU per request on its data path, measured in a few seconds (issue 18).

    bench/.env/bin/python -m bench.dataplane --repeats 3                # every load, 3 rounds
    bench/.env/bin/python -m bench.dataplane --loads stream --profile /tmp/prof

Two simulated replicas (``--replicas N``: scenario 5's instant ones, or paced ones for
``stream`` and ``slow``) and our router (cost policy, started as the benchmark starts it); a
closed loop drives one load at a time, and the router's CPU (utime+stime of its process tree,
from /proc as bench.cpu reads it) is divided by the requests answered. The loads run in turn in
every round, so a busy moment of the machine hits them all alike (with ``--trees``, every router
in turn: two versions compared on the same replicas, interleaved):

- ``stream``: 256-token chat answers streamed one SSE chunk per token, a token every 10 ms,
  16 in flight (scenario 1's data path: every chunk read and written on its own); ``slow``:
  the same at 3 in flight (~300 chunks a second, scenario 1's rate: most chunks wake the
  router on their own, so a chunk's cost is its path's footprint with cold caches);
- ``s5``: scenario 5's requests (16 tokens, 9 in 10 streamed) at 64 in flight (``s5c1``: at 1,
  for the added latency);
- ``plain``: 16-token answers, not streamed;
- ``idle``: no requests, what the background loops (health checks, scrapes, the hung-replica
  monitor) cost per second: it is in every scenario's figure, spread over its requests.

With ``--references`` the same loads also go, interleaved, through proxies that only relay
(bench.floor_proxies: on httptools, and on aiohttp's server and client), through vllm-router
round_robin and through nginx round robin: what a Python data path cannot go below, what
aiohttp alone costs, and the targets.

With ``--profile DIR`` py-spy samples the router during each load and writes its collapsed
stacks there (DIR/<load>-<round>.txt; bench.dataplane_profile summarizes them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.cpu import tree_cpu_seconds
from bench.floor_proxies import FloorPeer
from bench.load import FixedTarget, RequestSpec, run_closed_loop
from bench.peers import NginxPeer, OursPeer, Peer, PeerUnavailable, VllmRouterPeer
from bench.replicas import SimFleet, SimSettings
from bench.scenarios.harness import MODEL
from bench.scenarios.s5_overhead import INSTANT, overhead_spec

#: Replicas that stream a token every 10 ms whatever the batch: 16 streams in flight make
#: ~1,600 chunks per second, each read and written on its own.
PACED = SimSettings(model=MODEL, max_num_seqs=256, step_ms=10.0, batch_slowdown=0.0)
#: py-spy --native (C frames too: uvloop, the HTTP parser, syscalls); set by --native.
NATIVE = False
PROMPT = "request {}: " + " ".join(["fleet", "router", "token", "batch"] * 12)


@dataclass(frozen=True)
class Load:
    """One closed loop: what each request is and how many are in flight."""

    spec: Callable[[int], RequestSpec]
    concurrency: int
    #: The replicas it runs on: "paced" ones send a token every PACED.step_ms (each chunk its
    #: own read and write, as in scenario 1), "instant" ones answer at once (scenario 5).
    fleet: str = "instant"


def long_stream(i: int) -> RequestSpec:
    """A 256-token chat answer, streamed (the ``stream`` and ``slow`` loads)."""
    return RequestSpec(i, 0.0, PROMPT.format(i), 256, stream=True)


LOADS: dict[str, Load] = {
    "stream": Load(long_stream, 16, "paced"),
    "slow": Load(long_stream, 3, "paced"),
    "s5": Load(overhead_spec, 64),
    "s5c1": Load(overhead_spec, 1),
    "plain": Load(lambda i: RequestSpec(i, 0.0, PROMPT.format(i), 16, stream=False), 64),
}


@dataclass
class Result:
    load: str
    requests: int
    errors: int
    cpu_s: float
    wall_s: float
    #: Median send-to-last-byte of the successful requests (s); 0 when none.
    p50_s: float = 0.0

    @property
    def ms_per_request(self) -> float:
        return 1000.0 * self.cpu_s / max(1, self.requests)


def _py_spy() -> str:
    found = Path(sys.executable).parent / "py-spy"
    return str(found) if found.exists() else str(Path(__file__).parents[1] / ".venv/bin/py-spy")


async def run_load(
    name: str, router_pid: int, url: str, duration: float, profile: Path | None
) -> Result:
    """One load through the router; CPU read from /proc before and after."""
    spy = None
    if profile is not None:
        argv = [_py_spy(), "record", "-p", str(router_pid), "-r", "250", "--format", "raw"]
        argv += ["--native"] if NATIVE else []
        argv += ["-d", str(int(duration + 1)), "-o", str(profile)]
        argv += [] if NATIVE else ["--nonblocking"]  # --native must stop the process
        spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(0.5)  # py-spy attaches
    cpu0, t0 = tree_cpu_seconds(router_pid), time.perf_counter()
    if name == "idle":
        await asyncio.sleep(duration)
        records = []
    else:
        load = LOADS[name]
        target = FixedTarget(url)
        records = await run_closed_loop(
            target, load.spec, MODEL, concurrency=load.concurrency, duration=duration
        )
    cpu = tree_cpu_seconds(router_pid) - cpu0
    wall = time.perf_counter() - t0
    if spy is not None:
        spy.wait(timeout=duration + 30)
    errors = sum(1 for r in records if not r.ok)
    latencies = [r.latency for r in records if r.ok]
    p50 = statistics.median(latencies) if latencies else 0.0
    return Result(name, len(records), errors, cpu, wall, p50)


async def _start_router(
    workdir: Path, policy: str, python: str, tree: str, urls: list[str]
) -> OursPeer:
    """Our router in front of ``urls``, importing vllm_fleet from ``tree`` ("" = as installed)."""
    peer = OursPeer(workdir, policy, python)
    saved = os.environ.get("PYTHONPATH")
    if tree:
        os.environ["PYTHONPATH"] = tree  # the child inherits it: its vllm_fleet comes from tree
    try:
        await peer.start(urls)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return peer


def _references(workdir: Path, python: str) -> list[tuple[str, Peer]]:
    """What ``--references`` runs beside our router: the floor proxies (bench.floor_proxies:
    relaying only, on httptools and on aiohttp), vllm-router round_robin (scenario 5's target)
    and nginx round robin (scenario 1's bound: 1.5 times its CPU)."""
    return [
        ("floor-httptools", FloorPeer(workdir / "httptools", "httptools", python)),
        ("floor-aiohttp", FloorPeer(workdir / "aiohttp", "aiohttp", python)),
        ("floor-aiohttp-server", FloorPeer(workdir / "aiohttp-srv", "aiohttp-server", python)),
        ("vllm-router-rr", VllmRouterPeer(workdir / "vllm-router", "round_robin")),
        ("nginx-rr", NginxPeer(workdir / "nginx", "round_robin")),
    ]


async def main_async(args: argparse.Namespace) -> list[Result]:
    workdir = Path(tempfile.mkdtemp(prefix="dataplane-"))
    names = args.loads.split(",")
    wanted = {LOADS[n].fleet if n in LOADS else "instant" for n in names}
    fleets = {
        kind: SimFleet.of([settings] * args.replicas, workdir / kind, args.python)
        for kind, settings in (("instant", INSTANT), ("paced", PACED))
        if kind in wanted
    }
    routers: dict[tuple[str, str], Peer] = {}
    results: list[Result] = []
    try:
        for kind, fleet in fleets.items():
            await fleet.start()
            for label, tree in args.trees.items():
                where = workdir / f"router-{kind}-{label}"
                routers[(kind, label)] = await _start_router(
                    where, args.policy, args.python, tree, fleet.urls
                )
            if args.references:
                for label, reference in _references(workdir / f"refs-{kind}", args.python):
                    try:
                        await reference.start(fleet.urls)
                    except PeerUnavailable as exc:
                        print(f"{label}: not started ({exc})", flush=True)
                        continue
                    routers[(kind, label)] = reference
        labelled = list(dict.fromkeys(label for _, label in routers))
        for round_ in range(args.repeats):
            labels = list(labelled)
            if round_ % 2:
                labels.reverse()  # alternate which tree goes first
            for name in names:
                kind = LOADS[name].fleet if name in LOADS else "instant"
                for label in labels:
                    peer = routers.get((kind, label))
                    if peer is None or peer.child is None:
                        continue
                    await fleets[kind].wait_idle()
                    tag = f"{name}@{label}" if len(labelled) > 1 else name
                    profile = args.profile / f"{tag}-{round_}.txt" if args.profile else None
                    result = await run_load(name, peer.child.pid, peer.url, args.duration, profile)
                    result.load = tag
                    results.append(result)
                    per_s = 1000.0 * result.cpu_s / result.wall_s
                    print(
                        f"round {round_} {tag:12} {result.requests:6} req {result.errors} err "
                        f"{result.requests / result.wall_s:7.0f} req/s  "
                        f"{result.ms_per_request:6.3f} ms/req  ({per_s:.0f} ms CPU per s)  "
                        f"p50 {1000 * result.p50_s:.2f} ms",
                        flush=True,
                    )
    finally:
        for peer in routers.values():
            peer.stop()
        for fleet in fleets.values():
            fleet.stop()
    return results


def summary(results: list[Result]) -> str:
    """Per load: the median CPU ms/request over the rounds, and its spread (min-max)."""
    lines = []
    for name in dict.fromkeys(r.load for r in results):
        if name.partition("@")[0] == "idle":
            per_s = [1000.0 * r.cpu_s / r.wall_s for r in results if r.load == name]
            lines.append(
                f"{name:6} CPU ms per s: median {statistics.median(per_s):.1f} "
                f"({min(per_s):.1f}-{max(per_s):.1f})"
            )
            continue
        ms = [r.ms_per_request for r in results if r.load == name]
        rate = [r.requests / r.wall_s for r in results if r.load == name]
        p50 = [1000.0 * r.p50_s for r in results if r.load == name]
        lines.append(
            f"{name:6} ms/req: median {statistics.median(ms):.3f} ({min(ms):.3f}-{max(ms):.3f}); "
            f"req/s median {statistics.median(rate):.0f} ({min(rate):.0f}-{max(rate):.0f}); "
            f"p50 median {statistics.median(p50):.2f} ms ({min(p50):.2f}-{max(p50):.2f})"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.dataplane", description=__doc__)
    parser.add_argument("--loads", default="stream,s5,plain,idle", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the loads")
    parser.add_argument("--replicas", type=int, default=2, help="simulated replicas per fleet")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load")
    parser.add_argument("--policy", default="cost", help="the router's --policy")
    parser.add_argument("--python", default=sys.executable, help="runs the router and replicas")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    parser.add_argument(
        "--trees",
        default="",
        help="LABEL=DIR,...: one router per DIR (a folder holding a vllm_fleet package, put "
        "first on PYTHONPATH), the loads interleaved over them; default: the installed one",
    )
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    parser.add_argument(
        "--references",
        action="store_true",
        help="also run the floor proxies (bench.floor_proxies), vllm-router and nginx round robin",
    )
    args = parser.parse_args(argv)
    unknown = set(args.loads.split(",")) - {*LOADS, "idle"}
    if unknown:
        parser.error(f"--loads: unknown {', '.join(sorted(unknown))}; use {', '.join(LOADS)}, idle")
    trees = [t.partition("=") for t in args.trees.split(",") if t]
    args.trees = {label: tree for label, _, tree in trees} or {"installed": ""}
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global NATIVE
    NATIVE = args.native
    results = asyncio.run(main_async(args))
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
