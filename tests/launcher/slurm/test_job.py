"""`status --job` and `down --job` from SLURM's own output (captured text through a fake runner)
and the endpoint file; the agent's pure parts (Ray node count, ports, backends)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.slurm.agent import (
    RAY_SLOTS,
    AgentError,
    backend_urls,
    count_ray_nodes,
    poll_until,
    ray_ports,
    update_endpoint,
)
from vllm_fleet.launcher.slurm.job import cancel_job, job_status, parse_sacct, parse_scontrol
from vllm_fleet.launcher.slurm.script import PORT_RANGE

PENDING = (
    "JobId=42 JobName=vllm-fleet UserId=u(1) JobState=PENDING Reason=Resources Dependency=(null) "
    "NodeList=(null) StdOut=/scratch/logs/42.log"
)


def _running(log_dir: Path, state: str = "RUNNING") -> str:
    return f"JobId=42 JobState={state} Reason=None NodeList=gpu[1-2] StdOut={log_dir}/42.log"


class FakeSlurm:
    """Answers scontrol/sacct/scancel from canned text and records every call."""

    def __init__(self, *scontrol: str, sacct: str = "") -> None:
        self.scontrol = list(scontrol)
        self.sacct = sacct
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        self.calls.append(list(argv))
        if argv[0] == "scontrol":
            text = self.scontrol.pop(0) if len(self.scontrol) > 1 else self.scontrol[0]
            return (0, text) if text else (1, "")
        if argv[0] == "sacct":
            return (0, self.sacct) if self.sacct else (1, "")
        return 0, ""


def test_scontrol_and_sacct_lines_parse() -> None:
    fields = parse_scontrol(PENDING)
    assert (fields["JobState"], fields["Reason"], fields["StdOut"]) == (
        "PENDING", "Resources", "/scratch/logs/42.log",
    )  # fmt: skip
    assert parse_sacct("CANCELLED by 0|None\n") == ("CANCELLED", "None")


def test_pending_shows_slurms_reason(tmp_path: Path) -> None:
    status = job_status("42", tmp_path, run=FakeSlurm(PENDING))
    assert (status.state, status.detail) == ("PENDING", "waiting: Resources")


def test_starting_and_ready_come_from_the_endpoint_file(tmp_path: Path) -> None:
    health = {"http://gpu1:8002": "healthy", "http://gpu2:8002": "unhealthy"}
    update_endpoint(tmp_path / "42.json", state="starting", url="http://gpu1:8000/v1")
    starting = job_status("42", None, run=FakeSlurm(_running(tmp_path)), health=lambda _: health)
    update_endpoint(tmp_path / "42.json", state="ready")
    ready = job_status("42", None, run=FakeSlurm(_running(tmp_path)), health=lambda _: health)

    assert (starting.state, starting.replicas) == ("STARTING", health)
    assert (ready.state, ready.url, ready.replicas) == ("READY", "http://gpu1:8000/v1", health)


def test_failed_shows_the_last_log_line(tmp_path: Path) -> None:
    (tmp_path / "42.log").write_text(
        "loading\nvllm-fleet: error: Ray cluster: not after 60s\n\nvllm-fleet: stopping x\n"
    )
    status = job_status("42", None, run=FakeSlurm(_running(tmp_path, "FAILED")))
    assert (status.state, status.detail) == (
        "FAILED",
        "vllm-fleet: error: Ray cluster: not after 60s",
    )


def test_a_forgotten_job_is_read_from_sacct_and_an_unknown_one_is_one_line(tmp_path: Path) -> None:
    ended = job_status("42", tmp_path, run=FakeSlurm("", sacct="COMPLETED|None\n"))
    assert ended.state == "ENDED"
    with pytest.raises(ConfigError, match="--job 43: SLURM knows no such job"):
        job_status("43", tmp_path, run=FakeSlurm(""))


def test_down_asks_the_batch_script_to_stop_then_waits(tmp_path: Path) -> None:
    slurm = FakeSlurm(_running(tmp_path), _running(tmp_path), _running(tmp_path, "COMPLETED"))
    done = cancel_job("42", run=slurm, sleep=lambda _: None)
    assert done == "stopped (router, engine, Ray in order)"
    assert ["scancel", "--batch", "--signal=TERM", "42"] in slurm.calls
    assert ["scancel", "42"] not in slurm.calls


def test_down_cancels_when_the_trap_does_not_finish_in_time(tmp_path: Path) -> None:
    slurm = FakeSlurm(_running(tmp_path))
    ticks = iter(range(1000))
    done = cancel_job(
        "42", run=slurm, grace_s=5, clock=lambda: float(next(ticks)), sleep=lambda _: None
    )
    assert done == "did not stop within 5s; cancelled"
    assert slurm.calls[-1] == ["scancel", "42"]


RAY_STATUS = """======== Autoscaler status: 2026-12-02 22:05:04 ========
Node status
---------------------------------------------------------------
Active:
 1 node_4b309542cea76e684ccea6ad8beb1df4cf54d782c3d3f955fb362653
 1 node_9c1d
Pending:
 1 node_pending
Recent failures:
 (no failures)
"""


def test_ray_status_counts_active_nodes_only() -> None:
    assert count_ray_nodes(RAY_STATUS) == 2
    assert count_ray_nodes("") == 0


def test_ray_ports_stay_in_the_jobs_range_and_differ_per_slot() -> None:
    base = 20060
    head, worker = ray_ports(base, 0), ray_ports(base, 1)
    per_node = {k: v for k, v in head.items() if "worker-port" not in k}
    assert not set(per_node.values()) & set(ray_ports(base, 1).values())
    assert min(head.values()) > base + 1  # the GCS and client server come first
    assert max(ray_ports(base, RAY_SLOTS - 1).values()) < base - 60 + PORT_RANGE
    assert worker["min-worker-port"] > max(
        ray_ports(base, RAY_SLOTS - 1)["runtime-env-agent-port"], 0
    )


def test_backends_list_every_replica_of_every_node() -> None:
    assert backend_urls(["a", "b"], 9002, 2) == [
        "http://a:9002", "http://a:9003", "http://b:9002", "http://b:9003",
    ]  # fmt: skip


def test_the_endpoint_file_is_merged_and_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "7.json"
    update_endpoint(path, state="starting", url="http://n:1/v1", message=None)
    update_endpoint(path, state="ready")
    data = json.loads(path.read_text())
    assert (data["state"], data["url"]) == ("ready", "http://n:1/v1")
    assert list(tmp_path.iterdir()) == [path]


def test_polling_fails_when_the_step_it_waits_for_is_gone() -> None:
    with pytest.raises(AgentError, match="a step it needs exited"):
        poll_until(lambda: False, "Ray", 60, watch=[2**22 + 12345], sleep=lambda _: None)
    ticks = iter(range(100))
    with pytest.raises(AgentError, match="Ray: not after 3s"):
        poll_until(lambda: False, "Ray", 3, clock=lambda: float(next(ticks)), sleep=lambda _: None)
