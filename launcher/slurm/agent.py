"""The job's helper on the nodes: the steps of the sbatch script a shell does badly.

``python -m vllm_fleet.launcher.slurm.agent COMMAND``, called by the script
``vllm_fleet.launcher.slurm.script`` renders. Each command is small, bounded in time and says in one
line what went wrong:

* ``endpoint``: write the endpoint file (``<log dir>/<job id>.json``) atomically;
* ``backends``: the router's backends file from the node names and the planned ports;
* ``node-ip``: this node's address (the Ray head's, VLLM_HOST_IP);
* ``node-up``: `vllm-fleet up` with this node's own run directory (shape 1);
* ``ray-node``: `ray start --block` with the job's ports and this node's VLLM_HOST_IP;
* ``ray-wait``: poll `ray status` until it counts N nodes (never a fixed sleep);
* ``await-ready``: poll the router until it serves every replica, then mark the file READY.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from vllm_fleet.launcher.rundir import atomic_write_text
from vllm_fleet.launcher.runtime.process import process_alive

#: seconds between two polls of `ray status` or the router.
POLL_INTERVAL_S = 1.0
#: one `ray status` or HTTP call may take this long.
CALL_TIMEOUT_S = 30.0
#: Ray ports per node, after the GCS (+0) and the client server (+1): node manager, object
#: manager, dashboard agent (listen, gRPC), metrics export, runtime-env agent.
RAY_PORTS_PER_NODE = 6
#: nodes on one host get different ports up to this many (slot = SLURM_PROCID % this).
RAY_SLOTS = 13
#: Ray's worker processes take ports from this span after the per-node ports.
RAY_WORKER_PORTS = (80, 339)


class AgentError(Exception):
    """One line for the job's log; the agent exits 1."""


# --------------------------------------------------------------------------- endpoint file


def update_endpoint(path: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` (None: keep) into the endpoint file, replacing it atomically."""
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    data.update({k: v for k, v in fields.items() if v is not None})
    data["updated_at"] = time.time()
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return data


def _endpoint(args: argparse.Namespace) -> None:
    update_endpoint(
        Path(args.file),
        state=args.state,
        job=args.job,
        url=args.url,
        router=args.router,
        model=args.model,
        shape=args.shape,
        log=args.log,
        nodes=args.nodes,
        message=args.message,
    )


# --------------------------------------------------------------------------- backends, nodes


def backend_urls(hosts: Sequence[str], first_port: int, count: int) -> list[str]:
    """Every replica of every node: ``count`` ports from ``first_port`` on each host."""
    return [f"http://{host}:{first_port + i}" for host in hosts for i in range(count)]


def _backends(args: argparse.Namespace) -> None:
    first, count = int(args.ports[0]), int(args.ports[1])
    urls = backend_urls(args.hosts, first, count)
    atomic_write_text(Path(args.out), yaml.safe_dump(urls, default_flow_style=False))
    print(f"vllm-fleet: router backends: {', '.join(urls)}", flush=True)


def node_ip() -> str:
    """The address other nodes reach this one at (what Ray and vLLM call the node IP)."""
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        raise AgentError(f"cannot resolve this node's name {name!r} to an address") from None


def _node_up(args: argparse.Namespace) -> None:
    host = socket.gethostname().split(".")[0]
    run_dir = Path(args.run_dir) / host
    argv = [sys.executable, "-m", "vllm_fleet.launcher.cli", *args.rest, "--run-dir", str(run_dir)]
    print(f"vllm-fleet: {host}: {' '.join(argv[3:])}", flush=True)
    os.execv(sys.executable, argv)


# --------------------------------------------------------------------------- Ray


def ray_ports(port_base: int, slot: int) -> dict[str, int]:
    """This node's Ray ports inside the job's range (docs/slurm.md has the layout)."""
    first = port_base + 2 + (slot % RAY_SLOTS) * RAY_PORTS_PER_NODE
    names = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    )
    ports = {name: first + i for i, name in enumerate(names)}
    ports["min-worker-port"] = port_base + RAY_WORKER_PORTS[0]
    ports["max-worker-port"] = port_base + RAY_WORKER_PORTS[1]
    return ports


def ray_start_argv(
    ray: str, ip: str, port_base: int, slot: int, temp_dir: str, address: str | None
) -> list[str]:
    """`ray start --block` for the head (address None) or a worker joining ``address``."""
    argv = [ray, "start", "--block", f"--node-ip-address={ip}", "--disable-usage-stats"]
    if address is None:
        argv += [
            "--head",
            f"--port={port_base}",
            f"--ray-client-server-port={port_base + 1}",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
        ]
    else:
        argv.append(f"--address={address}")
    argv += [f"--{name}={port}" for name, port in ray_ports(port_base, slot).items()]
    return argv


def _ray_node(args: argparse.Namespace) -> None:
    ray = shutil.which("ray")
    if ray is None:
        raise AgentError("`ray` is not on PATH on this node; install ray (pip install ray)")
    ip = node_ip()
    # SLURM numbers the tasks of one srun: the head is slot 0, worker task k slot k + 1.
    slot = 0 if args.head else int(os.environ.get("SLURM_PROCID", "0")) + 1
    address = None if args.head else args.address
    argv = ray_start_argv(ray, ip, args.port_base, slot, args.temp_dir, address)
    os.environ["VLLM_HOST_IP"] = ip
    print(f"vllm-fleet: VLLM_HOST_IP={ip} {' '.join(argv)}", flush=True)
    os.execv(ray, argv)


def count_ray_nodes(status: str) -> int:
    """Nodes in the "Active:" part of `ray status` (lines like " 1 node_<id>")."""
    active, count = False, 0
    for line in status.splitlines():
        stripped = line.strip()
        if stripped == "Active:":
            active = True
            continue
        if active and (not line.startswith(" ") or stripped.endswith(":")):
            active = False
        parts = stripped.split()
        if active and len(parts) == 2 and parts[0].isdigit() and parts[1].startswith("node_"):
            count += int(parts[0])
    return count


def _ray_status(address: str) -> str:
    ray = shutil.which("ray") or "ray"
    try:
        done = subprocess.run(
            [ray, "status", f"--address={address}"],
            capture_output=True,
            text=True,
            timeout=CALL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def poll_until(
    check: Callable[[], bool],
    what: str,
    timeout_s: float,
    watch: Sequence[int] = (),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Call ``check`` until it is true; fail when ``timeout_s`` passes or a watched process
    (the step that should make it true) has exited."""
    deadline = clock() + timeout_s
    while not check():
        gone = [pid for pid in watch if not process_alive(pid)]
        if gone:
            raise AgentError(f"{what}: a step it needs exited (pid {gone[0]}); see the log above")
        if clock() >= deadline:
            raise AgentError(f"{what}: not after {timeout_s:g}s")
        sleep(POLL_INTERVAL_S)


def _ray_wait(args: argparse.Namespace) -> None:
    seen = [0]

    def enough() -> bool:
        seen[0] = count_ray_nodes(_ray_status(args.address))
        return seen[0] >= int(args.nodes)

    what = f"Ray cluster at {args.address} with {args.nodes} node(s)"
    poll_until(enough, what, args.timeout, args.watch_pid)
    print(f"vllm-fleet: Ray has {seen[0]} node(s)", flush=True)


# --------------------------------------------------------------------------- readiness


def router_healthy(router: str) -> int:
    """Replicas the router reports healthy on /ready (0 when it does not answer yet)."""
    try:
        with urllib.request.urlopen(f"{router}/ready", timeout=CALL_TIMEOUT_S) as resp:
            return int(json.loads(resp.read()).get("healthy", 0))
    except (OSError, ValueError, urllib.error.URLError):
        return 0


def _await_ready(args: argparse.Namespace) -> None:
    path = Path(args.endpoint)
    router = str(json.loads(path.read_text(encoding="utf-8"))["router"])
    what = f"router {router} serving {args.replicas} replica(s)"
    try:
        poll_until(
            lambda: router_healthy(router) >= args.replicas, what, args.timeout, args.watch_pid
        )
    except AgentError as exc:
        update_endpoint(path, state="failed", message=str(exc))
        raise
    data = update_endpoint(path, state="ready", ready_at=time.time(), message="")
    print(f"vllm-fleet: READY {data.get('url', router)}", flush=True)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vllm_fleet.launcher.slurm.agent")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("endpoint")
    p.add_argument("--file", required=True)
    p.add_argument("--state", required=True)
    for name in ("job", "url", "router", "model", "shape", "log", "message"):
        p.add_argument(f"--{name}")
    p.add_argument("--nodes", nargs="*")
    p.set_defaults(func=_endpoint)
    p = sub.add_parser("backends")
    p.add_argument("--out", required=True)
    p.add_argument("--ports", nargs=2, required=True, metavar=("FIRST", "COUNT"))
    p.add_argument("--hosts", nargs="+", required=True)
    p.set_defaults(func=_backends)
    p = sub.add_parser("node-ip")
    p.set_defaults(func=lambda _: print(node_ip()))
    p = sub.add_parser("node-up")
    p.add_argument("--run-dir", required=True)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_node_up)
    p = sub.add_parser("ray-node")
    p.add_argument("--head", action="store_true")
    p.add_argument("--address")
    p.add_argument("--port-base", type=int, required=True)
    p.add_argument("--temp-dir", required=True)
    p.set_defaults(func=_ray_node)
    for name, func in (("ray-wait", _ray_wait), ("await-ready", _await_ready)):
        p = sub.add_parser(name)
        if name == "ray-wait":
            p.add_argument("--address", required=True)
            p.add_argument("--nodes", type=int, required=True)
        else:
            p.add_argument("--endpoint", required=True)
            p.add_argument("--replicas", type=int, required=True)
        p.add_argument("--timeout", type=float, required=True)
        p.add_argument("--watch-pid", type=int, action="append", default=[])
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "rest", None) and args.rest[0] == "--":
        args.rest = args.rest[1:]
    try:
        args.func(args)
    except AgentError as exc:
        print(f"vllm-fleet: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
