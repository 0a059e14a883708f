"""The multi-node leader and worker shell scripts, run for real by /bin/sh with stand-ins for
`ray`, `python3` (the Ray membership query, and the vLLM server) and `sleep` on PATH: the leader
must wait for the whole group before serving and pass every vLLM argument through untouched;
the worker must retry joining the head and give up after its deadline."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helm.render import MODEL, load_chart, render, with_model
from vllm_fleet.launcher.vllm_args import SERVER_MODULE

VALUES = with_model(
    {
        "model": {"servedName": "big model"},
        "engine": {
            "tensorParallelSize": 8,
            "extraArgs": ["--override-generation-config", '{"temperature": 0.5}'],
            "multiNode": {"enabled": True, "pipelineParallelSize": 3, "rayJoinTimeoutSeconds": 60},
        },
    }
)


@pytest.fixture(scope="module")
def lws_containers() -> Iterator[dict[str, dict[str, Any]]]:
    with load_chart() as chart:
        out = render(chart, VALUES)
    template = out.one("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    yield {
        "leader": template["leaderTemplate"]["spec"]["containers"][0],
        "worker": template["workerTemplate"]["spec"]["containers"][0],
    }


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _run(
    container: dict[str, Any],
    tmp_path: Path,
    alive_counts: list[int],
    ray_fails: int,
) -> subprocess.CompletedProcess[str]:
    """Run the container's command + args under /bin/sh with the stand-ins."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    counts = tmp_path / "alive"
    counts.write_text("".join(f"{n}\n" for n in alive_counts))
    fails = tmp_path / "fails"
    fails.write_text(str(ray_fails))
    # ray: log the call; `ray start --address` fails the first $fails times.
    _stub(
        bin_dir,
        "ray",
        f'echo "ray $*" >> {log}\n'
        f'case "$*" in *--address=*) n=$(cat {fails}); '
        f'if [ "$n" -gt 0 ]; then echo $((n-1)) > {fails}; exit 1; fi;; esac\n',
    )
    # python3 -m <server>: log each argument. python3 -c <membership query>: print the next
    # alive count (the last one repeats), after a line of noise such as Ray's own messages.
    _stub(
        bin_dir,
        "python3",
        f'if [ "$1" = -m ]; then for a in "$@"; do echo "vllm-arg:$a" >> {log}; done; exit 0; fi\n'
        f'echo "python3 query" >> {log}\necho "some ray log line"\n'
        f"head -n 1 {counts}\n"
        f'if [ "$(wc -l < {counts})" -gt 1 ]; then sed -i 1d {counts}; fi\n',
    )
    _stub(bin_dir, "sleep", f'echo "sleep $*" >> {log}\n')
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "LWS_GROUP_SIZE": "3",
        "LWS_LEADER_ADDRESS": "fleet-engine-0.fleet-engine.llm",
    }
    result = subprocess.run(
        [*container["command"], *container.get("args", [])],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    result.stdout += log.read_text() if log.exists() else ""
    return result


def test_leader_waits_for_the_group_then_serves_with_every_arg_intact(
    lws_containers: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    result = _run(lws_containers["leader"], tmp_path, alive_counts=[1, 2, 3], ray_fails=0)
    assert result.returncode == 0, result.stderr
    calls = result.stdout.splitlines()
    assert "ray start --head --port=6379 --disable-usage-stats" in calls
    assert calls.count("python3 query") == 3  # asked until all 3 nodes were alive
    vllm_args = [c.removeprefix("vllm-arg:") for c in calls if c.startswith("vllm-arg:")]
    assert vllm_args[:4] == ["-m", SERVER_MODULE, "--model", MODEL]
    assert vllm_args[vllm_args.index("--served-model-name") + 1] == "big model"
    assert vllm_args[vllm_args.index("--pipeline-parallel-size") + 1] == "3"
    assert vllm_args[vllm_args.index("--tensor-parallel-size") + 1] == "8"
    assert vllm_args[-1] == '{"temperature": 0.5}'  # spaces and quotes survive


def test_leader_gives_up_when_the_group_never_forms(
    lws_containers: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    container = dict(lws_containers["leader"])
    # A zero deadline: the first incomplete answer ends the wait.
    container["command"] = [
        *container["command"][:2],
        container["command"][2].replace("+ 60 ))", "+ 0 ))"),
        *container["command"][3:],
    ]
    result = _run(container, tmp_path, alive_counts=[2], ray_fails=0)
    assert result.returncode == 1
    assert "only 2 of 3 Ray nodes joined" in result.stderr
    assert "vllm-arg:" not in result.stdout


def test_worker_retries_joining_the_head_and_blocks_there(
    lws_containers: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    result = _run(lws_containers["worker"], tmp_path, alive_counts=[0], ray_fails=2)
    assert result.returncode == 0, result.stderr
    joins = [c for c in result.stdout.splitlines() if c.startswith("ray start")]
    assert joins == ["ray start --address=fleet-engine-0.fleet-engine.llm:6379 --block"] * 3
    assert "vllm-arg:" not in result.stdout


def test_worker_gives_up_after_its_deadline(
    lws_containers: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    container = dict(lws_containers["worker"])
    container["command"] = [
        *container["command"][:2],
        container["command"][2].replace("+ 60 ))", "+ 0 ))"),
    ]
    result = _run(container, tmp_path, alive_counts=[0], ray_fails=100)
    assert result.returncode == 1
    assert "could not join the Ray head at fleet-engine-0.fleet-engine.llm:6379" in result.stderr


def test_ray_port_comes_from_values() -> None:
    values = with_model({"engine": {"multiNode": {"enabled": True, "rayPort": 7000}}})
    with load_chart() as chart:
        out = render(chart, values)
    template = out.one("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    assert "ray start --head --port=7000" in leader["command"][2]
    assert ":7000 --block" in template["workerTemplate"]["spec"]["containers"][0]["command"][2]
    assert {"name": "ray", "containerPort": 7000, "protocol": "TCP"} in leader["ports"]
