"""Shape 2's Ray bring-up for real on one machine: the rendered script, run by bash with stand-ins
for the three SLURM tools it calls (srun runs the tasks here, scontrol names two nodes, squeue
lists no steps), starts a real Ray head and a real Ray worker (Ray 2.60 from .ci/slurm-setup),
waits until `ray status` counts both, runs the simulator where vLLM would be and the router in
front. SIGTERM (what `#SBATCH --signal=B:TERM` delivers) stops router, engine, workers, head in
that order and leaves no process. The GPU command line itself is checked by test_script.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import openai
import pytest

from tests.launcher.slurm.support import render, shellcheck
from tests.launcher.slurm.test_cluster import job_processes
from tests.support.ports import port_free
from vllm_fleet.launcher.slurm.script import FIRST_PORT, PORT_RANGE, PORT_SLOTS

RAY_PATH = Path(os.environ.get("RAY_DIR", "/var/tmp/vllm-fleet-ray")) / "path"
#: Ray's head takes ~25 s to start on a loaded 2-core machine, a worker ~5 s more.
READY_BUDGET_S = 150.0
STOP_BUDGET_S = 60.0

SRUN = r"""#!/bin/bash
# srun on one machine: runs the step's tasks here (SLURM_PROCID per task), passes SIGTERM on.
nodes=1 ntasks=""
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes=*) nodes=${1#*=} ;;
        --ntasks=*) ntasks=${1#*=} ;;
        --*) ;;
        *) break ;;
    esac
    shift
done
pids=()
for ((i = 0; i < ${ntasks:-$nodes}; i++)); do
    SLURM_PROCID=$i "$@" &
    pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
done
"""
SCONTROL = """#!/bin/bash
# scontrol show hostnames: two made-up node names (this machine plays both).
[ "$1 $2" = "show hostnames" ] && printf 'node-a\\nnode-b\\n'
"""
SQUEUE = "#!/bin/sh\n# no steps listed: the script then signals srun, which passes it on.\n"


def _fake_slurm(directory: Path) -> None:
    directory.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("squeue", SQUEUE)):
        path = directory / name
        path.write_text(text)
        path.chmod(0o755)
        assert shellcheck(path).returncode == 0


def _free_job_id() -> int:
    """A made-up job id whose port range is free here."""
    for slot in range(PORT_SLOTS):
        base = FIRST_PORT + slot * PORT_RANGE
        if all(port_free(base + offset) for offset in (0, 50, 60, 61, 62, 70, 80)):
            return 900_000 + slot
    pytest.fail("no free port range for the job")


def _wait(check: object, what: str, timeout: float, log: Path) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout:g}s; log:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def test_ray_head_then_worker_then_engine_and_router_stop_in_reverse(tmp_path: Path) -> None:
    assert (RAY_PATH / "ray").exists(), "Ray is missing: run `bash .ci/slurm-setup`"
    config = tmp_path / "fleet.yaml"
    config.write_text("engine: sim\nslurm: {shape: ray}\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    script, layout = render(config, 2, logs)
    assert layout.shape == "ray"
    (tmp_path / "job.sbatch").write_text(script)
    _fake_slurm(tmp_path / "bin")
    job_id = str(_free_job_id())
    log = logs / f"{job_id}.log"
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{RAY_PATH}:{os.environ['PATH']}",
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_JOB_NUM_NODES": "2",
    }
    with open(log, "wb") as out:
        job = subprocess.Popen(
            ["bash", str(tmp_path / "job.sbatch")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        endpoint = logs / f"{job_id}.json"

        def ready() -> bool:
            assert job.poll() is None, log.read_text()
            return endpoint.exists() and json.loads(endpoint.read_text())["state"] == "ready"

        _wait(ready, "the job ready", READY_BUDGET_S, log)
        text = log.read_text()
        # the head alone first, then both nodes, before the engine started.
        assert text.index("Ray has 1 node(s)") < text.index("Ray has 2 node(s)")
        assert text.index("Ray has 2 node(s)") < text.index("vllm-fleet sim: serving")
        assert "VLLM_HOST_IP=" in text and "--address=" in text
        url = json.loads(endpoint.read_text())["url"]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=30)
        answer = client.completions.create(model="sim-model", prompt="hello", max_tokens=4)
        assert answer.choices[0].text
        assert len(job_processes(job_id)) > 6  # script, srun stand-ins, Ray, sim, router

        job.send_signal(signal.SIGTERM)
        job.wait(timeout=STOP_BUDGET_S)
        _wait(lambda: not job_processes(job_id), "every process gone", 30, log)
        text = log.read_text()
        stops = [text.index(f"stopping fleet-{part}")
                 for part in ("router", "engine", "ray-workers", "ray-head")]  # fmt: skip
        assert stops == sorted(stops)
        assert f"job {job_id} ended (stopped)" in text
        assert json.loads(endpoint.read_text())["state"] == "stopped"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        for pid in job_processes(job_id):
            os.kill(pid, signal.SIGKILL)
