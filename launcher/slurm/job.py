"""A submitted fleet job, read back: SLURM's view (scontrol, squeue, sacct) plus the endpoint
file the job writes (``<log dir>/<job id>.json``), for `vllm-fleet status --job` and
`vllm-fleet down --job`.

SLURM says whether the job waits (and why), runs or ended; the endpoint file says how far the
fleet inside got. The parsers are pure functions over the tools' text so they are tested on
captured output; the SLURM tools are run through one injectable ``Runner``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_fleet.launcher.errors import ConfigError

#: runs one SLURM command, returns (exit status, stdout).
Runner = Callable[[Sequence[str]], tuple[int, str]]

#: SLURM job states in which the batch script is (about to be) running.
RUNNING_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"})
#: ended badly: the fleet did not stop by itself or by request.
FAILED_STATES = frozenset(
    {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)
#: how long `down --job` lets the job's trap stop router, engine and Ray before cancelling.
DOWN_GRACE_S = 180.0


def run_tool(argv: Sequence[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise ConfigError(
            f"--job: `{argv[0]}` is not installed here; run this on a SLURM login node"
        ) from None
    except subprocess.TimeoutExpired:
        return 1, ""
    return done.returncode, done.stdout


@dataclass(frozen=True)
class SlurmJob:
    """What SLURM says about one job."""

    job_id: str
    state: str
    reason: str = ""
    nodes: str = ""
    #: the batch script's log (StdOut=), whose directory holds the endpoint file.
    log: str = ""


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show job -o ID`: one line of Key=Value pairs (values have no spaces, except
    a few at the end like Command= which are not needed here)."""
    pairs: dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep and key not in pairs:
            pairs[key] = value
    return pairs


def parse_sacct(text: str) -> tuple[str, str]:
    """`sacct -j ID -X -n -P -o State,Reason`: the allocation's state (``CANCELLED by 0`` ->
    CANCELLED) and reason."""
    for line in text.splitlines():
        if line.strip():
            state, _, reason = line.partition("|")
            return state.split()[0] if state.split() else "", reason.strip()
    return "", ""


def slurm_job(job_id: str, run: Runner = run_tool) -> SlurmJob:
    """The job as scontrol knows it, or sacct once scontrol has forgotten it."""
    code, out = run(["scontrol", "show", "job", "-o", job_id])
    fields = parse_scontrol(out) if code == 0 else {}
    if fields.get("JobState"):
        return SlurmJob(
            job_id=job_id,
            state=fields["JobState"],
            reason=fields.get("Reason", "None"),
            nodes=fields.get("NodeList", ""),
            log=fields.get("StdOut", ""),
        )
    code, out = run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,Reason"])
    state, reason = parse_sacct(out) if code == 0 else ("", "")
    if state:
        return SlurmJob(job_id=job_id, state=state, reason=reason)
    raise ConfigError(
        f"--job {job_id}: SLURM knows no such job (scontrol and sacct); check the job id"
    )


def read_endpoint(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def last_log_line(path: str, prefer: str = "") -> str:
    """The newest non-empty line of the job's log ("" when there is none); with ``prefer``, the
    newest line containing it if any (a failure's error, not the trap's goodbye after it)."""
    try:
        with open(path, "rb") as log:
            log.seek(0, 2)
            log.seek(max(0, log.tell() - 8192))
            lines = log.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    lines = [line.strip() for line in lines if line.strip()]
    preferred = [line for line in lines if prefer and prefer in line.lower()]
    return (preferred or lines or [""])[-1]


@dataclass(frozen=True)
class JobStatus:
    """PENDING (with SLURM's reason), STARTING, READY (with the URL), FAILED (with the last
    log line) or ENDED."""

    job_id: str
    state: str
    slurm_state: str
    detail: str = ""
    url: str = ""
    #: replica url -> "healthy" / "unhealthy" from the router, while the job runs.
    replicas: dict[str, str] = field(default_factory=dict)


def replica_health(url: str, timeout: float = 3.0) -> dict[str, str]:
    """Per-replica health as the job's router sees it ({} when it does not answer)."""
    base = url.removesuffix("/v1")
    try:
        with urllib.request.urlopen(f"{base}/fleet/replicas", timeout=timeout) as resp:
            rows = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return {}
    return {str(r.get("url")): "healthy" if r.get("healthy") else "unhealthy" for r in rows}


def job_status(
    job_id: str,
    log_dir: Path | None,
    run: Runner = run_tool,
    health: Callable[[str], dict[str, str]] = replica_health,
) -> JobStatus:
    job = slurm_job(job_id, run)
    log = job.log or (str(log_dir / f"{job_id}.log") if log_dir else "")
    directory = Path(job.log).parent if job.log else log_dir
    endpoint = read_endpoint(directory / f"{job_id}.json") if directory else None
    fleet_state = str((endpoint or {}).get("state", ""))
    url = str((endpoint or {}).get("url", ""))
    if job.state == "PENDING":
        return JobStatus(job_id, "PENDING", job.state, f"waiting: {job.reason}")
    if job.state in FAILED_STATES or fleet_state == "failed":
        why = (endpoint or {}).get("message") or last_log_line(log, "error") or job.reason
        return JobStatus(job_id, "FAILED", job.state, str(why), url)
    if job.state in RUNNING_STATES:
        if fleet_state == "ready":
            return JobStatus(job_id, "READY", job.state, f"serving on {url}", url, health(url))
        rows = health(url) if url else {}
        return JobStatus(job_id, "STARTING", job.state, last_log_line(log), url, rows)
    return JobStatus(job_id, "ENDED", job.state, fleet_state or job.reason, url)


def render_status(status: JobStatus) -> str:
    lines = [f"Job {status.job_id}: {status.state} (SLURM {status.slurm_state})"]
    if status.url:
        lines.append(f"  endpoint {status.url}")
    if status.detail:
        lines.append(f"  {status.detail}")
    lines += [f"  {url}  {health}" for url, health in sorted(status.replicas.items())]
    return "\n".join(lines)


def cancel_job(
    job_id: str,
    run: Runner = run_tool,
    grace_s: float = DOWN_GRACE_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """scancel, orderly: SIGTERM to the batch script only, whose trap stops router, engine and
    Ray in that order; a plain scancel when it has not ended after ``grace_s`` (or when the
    job has not started). Returns what was done."""
    job = slurm_job(job_id, run)
    if job.state not in RUNNING_STATES:
        if job.state == "PENDING":
            run(["scancel", job_id])
            return "cancelled while pending"
        return f"already ended ({job.state})"
    run(["scancel", "--batch", "--signal=TERM", job_id])
    deadline = clock() + grace_s
    while clock() < deadline:
        if slurm_job(job_id, run).state not in RUNNING_STATES - {"COMPLETING"}:
            return "stopped (router, engine, Ray in order)"
        sleep(0.5)
    run(["scancel", job_id])
    return f"did not stop within {grace_s:g}s; cancelled"


# --------------------------------------------------------------------------- `--job` options


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """`status` and `down` act on a `vllm-fleet slurm` job with these instead of --run-dir."""
    parser.add_argument("--job", metavar="ID", help="a SLURM job started by `vllm-fleet slurm`")
    parser.add_argument(
        "--log-dir",
        metavar="DIR",
        help="the job's log directory, when SLURM has forgotten the job (default slurm-logs)",
    )


def _job_id(args: argparse.Namespace) -> str:
    job_id = str(args.job).strip()
    if not job_id.isdigit():
        raise ConfigError(f"--job {args.job!r}: expected a numeric SLURM job id, e.g. --job 1234")
    return job_id


def job_status_command(args: argparse.Namespace) -> int:
    status = job_status(_job_id(args), Path(args.log_dir or "slurm-logs").resolve())
    if getattr(args, "json", False):
        print(json.dumps(dataclasses.asdict(status), indent=2))
    else:
        print(render_status(status))
    return 1 if status.state == "FAILED" else 0


def job_down_command(args: argparse.Namespace) -> int:
    job_id = _job_id(args)
    print(f"Job {job_id}: {cancel_job(job_id)}.")
    return 0
