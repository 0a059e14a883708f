"""Shape 1 on a real SLURM cluster (one node on localhost, started by .ci/slurm-setup): submit
with `vllm-fleet slurm --submit`, wait for the endpoint file, ask the router with the official
openai client, read `vllm-fleet status --job`, stop with `vllm-fleet down --job` (scancel), and
find no process of the job left. The simulator stands in for vLLM so the job is up in seconds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from vllm_fleet.launcher.slurm.job import slurm_job

#: the whole test stays under this (submit, ready, requests, status, down).
BUDGET_S = 110.0


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vllm_fleet.launcher.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_processes(job_id: str) -> list[int]:
    """Processes started for the job: SLURM puts SLURM_JOB_ID in every task's environment."""
    mark = f"SLURM_JOB_ID={job_id}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if environ.startswith(mark) or b"\0" + mark in environ:
            found.append(int(entry.name))
    return found


def _wait(check: object, what: str, deadline: float, log: Path) -> None:
    assert callable(check)
    while not check():
        if time.monotonic() > deadline:
            text = log.read_text() if log.exists() else "(no log)"
            pytest.fail(f"{what} not within the budget; job log:\n{text[-3000:]}")
        time.sleep(0.2)


@pytest.fixture
def cluster() -> None:
    assert shutil.which("sbatch"), "no SLURM here: run `bash .ci/slurm-setup` first"
    state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    assert state.returncode == 0 and state.stdout.split(), (
        f"SLURM does not answer ({state.stderr.strip()}): run `bash .ci/slurm-setup`"
    )


@pytest.fixture
def submitted(cluster: None, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    logs = tmp_path / "logs"
    config = tmp_path / "fleet.yaml"
    config.write_text(
        f"engine: sim\nreplicas: 2\nslurm: {{log_dir: {logs}, time: '5', job_name: fleet-ci}}\n"
    )
    out = _cli("slurm", "--config", str(config), "--nodes", "1",
               "-o", str(tmp_path / "job.sbatch"), "--submit")  # fmt: skip
    assert out.returncode == 0, out.stderr
    found = re.search(r"Submitted job (\d+)", out.stdout)
    assert found, out.stdout
    job_id = found.group(1)
    try:
        yield job_id, logs
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


def test_shape_one_runs_as_a_job_serves_and_leaves_nothing(submitted: tuple[str, Path]) -> None:
    deadline = time.monotonic() + BUDGET_S
    job_id, logs = submitted
    endpoint, log = logs / f"{job_id}.json", logs / f"{job_id}.log"

    def ready() -> bool:
        if not endpoint.exists():
            return False
        state = str(json.loads(endpoint.read_text())["state"])
        assert state in ("starting", "ready"), log.read_text()
        return state == "ready"

    _wait(ready, "the endpoint file saying ready", deadline, log)
    data = json.loads(endpoint.read_text())
    assert data["job"] == job_id and data["shape"] == "replicas" and data["model"] == "sim-model"
    # the URL is in the job's log too (printed right after the file is written).
    _wait(lambda: f"ready at {data['url']}" in log.read_text(), "the URL in the log", deadline, log)
    port = int(data["url"].rsplit(":", 1)[1].split("/")[0])

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=30)
    answers = [
        client.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=8
        )
        for i in range(4)
    ]
    assert all(a.choices[0].message.content for a in answers)
    assert [m.id for m in client.models.list().data] == ["sim-model"]

    status = _cli("status", "--job", job_id)
    assert status.returncode == 0, status.stderr
    assert f"Job {job_id}: READY (SLURM RUNNING)" in status.stdout
    assert data["url"] in status.stdout
    assert status.stdout.count(" healthy") == 2, status.stdout

    running = job_processes(job_id)
    assert len(running) >= 4, running  # batch shell, up, replicas, routers
    down = _cli("down", "--job", job_id, timeout=max(5.0, deadline - time.monotonic()))
    assert down.returncode == 0, down.stderr
    assert "stopped (router, engine, Ray in order)" in down.stdout

    _wait(lambda: not job_processes(job_id), "every process of the job gone", deadline, log)
    _wait(
        lambda: slurm_job(job_id).state not in ("RUNNING", "COMPLETING"),
        "SLURM seeing the job end",
        deadline,
        log,
    )
    text = log.read_text()
    assert text.index("stopping fleet-router") < text.index("stopping fleet-engine")
    assert f"job {job_id} ended (stopped)" in text
    assert json.loads(endpoint.read_text())["state"] == "stopped"
    ended = _cli("status", "--job", job_id)
    assert f"Job {job_id}: ENDED (SLURM COMPLETED)" in ended.stdout, ended.stdout


def _submit(tmp_path: Path, settings: str, *flags: str) -> str:
    config = tmp_path / "fleet.yaml"
    config.write_text(
        f"engine: sim\nreplicas: 2\nslurm: {{log_dir: {tmp_path / 'logs'}, {settings}}}\n"
    )
    out = _cli("slurm", "--config", str(config), "--nodes", "1", "--submit", *flags)
    assert out.returncode == 0, out.stderr
    found = re.search(r"Submitted job (\d+)", out.stdout)
    assert found, out.stdout
    return found.group(1)


def test_a_batch_job_runs_its_input_through_its_fleet_and_ends(
    cluster: None, tmp_path: Path
) -> None:
    deadline = time.monotonic() + BUDGET_S
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "sim-model", "prompt": f"p{i}", "max_tokens": 4}}
        for i in range(5)
    ]  # fmt: skip
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    results = tmp_path / "out.jsonl"
    job_id = _submit(tmp_path, "time: '5'", "--batch", str(requests), "-o", str(results),
                     "--script", str(tmp_path / "batch.sbatch"))  # fmt: skip
    try:
        log = tmp_path / "logs" / f"{job_id}.log"
        _wait(lambda: slurm_job(job_id).state == "COMPLETED", "the job completing", deadline, log)
        done = [json.loads(line) for line in results.read_text().splitlines()]
        assert sorted(d["custom_id"] for d in done) == [f"r{i}" for i in range(5)]
        assert all(d["response"]["status_code"] == 200 for d in done)
        assert f"job {job_id} ended (completed)" in log.read_text()
        _wait(lambda: not job_processes(job_id), "every process of the job gone", deadline, log)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


def test_a_pending_job_shows_slurms_reason_and_is_cancelled(cluster: None, tmp_path: Path) -> None:
    job_id = _submit(tmp_path, "extra_sbatch: ['--begin=now+1hour']", "-o", str(tmp_path / "j.sh"))
    try:
        status = _cli("status", "--job", job_id)
        assert f"Job {job_id}: PENDING (SLURM PENDING)" in status.stdout, status.stdout
        assert "waiting: BeginTime" in status.stdout
        down = _cli("down", "--job", job_id)
        assert f"Job {job_id}: cancelled while pending." in down.stdout
        assert slurm_job(job_id).state == "CANCELLED"
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


def test_a_plain_scancel_leaves_nothing_either(cluster: None, tmp_path: Path) -> None:
    """What SLURM does on its own (scancel, the time limit): every step and the batch script get
    SIGTERM at once, SIGKILL after KillWait; the trap still runs and nothing survives."""
    deadline = time.monotonic() + BUDGET_S
    job_id = _submit(tmp_path, "time: '5'", "-o", str(tmp_path / "j.sbatch"))
    try:
        endpoint = tmp_path / "logs" / f"{job_id}.json"
        log = tmp_path / "logs" / f"{job_id}.log"

        def ready() -> bool:
            return endpoint.exists() and json.loads(endpoint.read_text())["state"] == "ready"

        _wait(ready, "the job ready", deadline, log)
        assert job_processes(job_id)
        subprocess.run(["scancel", job_id], check=True, capture_output=True)
        _wait(lambda: not job_processes(job_id), "every process of the job gone", deadline, log)
        # The processes are gone before slurmctld has heard of it: COMPLETING until then.
        _wait(
            lambda: slurm_job(job_id).state != "COMPLETING",
            "SLURM seeing the job end",
            deadline,
            log,
        )
        assert slurm_job(job_id).state == "CANCELLED"
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
