from __future__ import annotations

import os
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.launcher.support import pgid
from tests.support.sim import wait_until
from vllm_fleet.launcher.plan_types import ReplicaSpec, ServerSpec
from vllm_fleet.launcher.runtime.base import ServerHandle, ServerStatus
from vllm_fleet.launcher.runtime.process import (
    ProcessRuntime,
    group_members,
    last_line,
    process_alive,
)

DEADLINE_S = 10.0


async def running(runtime: ProcessRuntime, handle: ServerHandle) -> bool:
    return (await runtime.status(handle)).running


async def exited(runtime: ProcessRuntime, handle: ServerHandle) -> bool:
    return not await running(runtime, handle)


def python_spec(name: str, code: str, gpus: tuple[int, ...] = (), **env: str) -> ReplicaSpec:
    return ReplicaSpec(
        name=name,
        host="127.0.0.1",
        model="test-model",
        port=1,
        gpus=gpus,
        tensor_parallel_size=1,
        command=(sys.executable, "-c", textwrap.dedent(code)),
        env=dict(env),
    )


class TrackingRuntime(ProcessRuntime):
    """Remembers every handle so the fixture can kill whatever a failing test left behind."""

    def __init__(self, log_dir: Path, **kwargs: int) -> None:
        super().__init__(log_dir, **kwargs)
        self.handles: list[ServerHandle] = []

    async def start(self, spec: ServerSpec) -> ServerHandle:
        handle = await super().start(spec)
        self.handles.append(handle)
        return handle


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[TrackingRuntime]:
    rt = TrackingRuntime(tmp_path / "logs")
    yield rt
    for handle in rt.handles:
        await rt.stop(handle, timeout=0.1)


@pytest.fixture
async def small_log_runtime(tmp_path: Path) -> AsyncIterator[TrackingRuntime]:
    rt = TrackingRuntime(tmp_path / "logs", max_log_bytes=1000, log_backups=2)
    yield rt
    for handle in rt.handles:
        await rt.stop(handle, timeout=0.1)


SPAWNS_GRANDCHILD = """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.environ["PID_FILE"] + ".tmp", "w") as f:
        f.write(str(child.pid))
    os.replace(os.environ["PID_FILE"] + ".tmp", os.environ["PID_FILE"])
    print("gpus", os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
    print("serving", flush=True)
    time.sleep(60)
"""


async def read_pid(path: Path) -> int:
    await wait_until(path.exists, DEADLINE_S, what=f"{path}")
    return int(path.read_text())


async def test_stop_kills_the_whole_process_group(runtime: TrackingRuntime, tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    handle = await runtime.start(
        python_spec("r0", SPAWNS_GRANDCHILD, gpus=(2, 3), PID_FILE=str(pid_file))
    )
    grandchild = await read_pid(pid_file)
    await wait_until(
        lambda: last_line(handle.log_path) == "serving", DEADLINE_S, what="the log line"
    )
    assert "gpus 2,3" in handle.log_path.read_text()
    assert os.getpgid(grandchild) == pgid(handle)
    assert await runtime.status(handle) == ServerStatus(running=True)

    status = await runtime.stop(handle, timeout=5.0)

    assert not status.running
    assert not process_alive(pgid(handle))
    assert not process_alive(grandchild)
    assert group_members(pgid(handle)) == []


async def test_sigkill_after_timeout_when_sigterm_is_ignored(
    runtime: TrackingRuntime, tmp_path: Path
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = """
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        open(os.environ["PID_FILE"] + ".tmp", "w").write(str(child.pid))
        os.replace(os.environ["PID_FILE"] + ".tmp", os.environ["PID_FILE"])
        time.sleep(60)
    """
    handle = await runtime.start(python_spec("stubborn", code, PID_FILE=str(pid_file)))
    grandchild = await read_pid(pid_file)

    started = time.monotonic()
    status = await runtime.stop(handle, timeout=0.5)
    elapsed = time.monotonic() - started

    assert elapsed >= 0.5
    assert status.returncode == -9
    assert not process_alive(pgid(handle))
    assert not process_alive(grandchild)


async def test_grandchild_outliving_its_parent_is_still_stopped(
    runtime: TrackingRuntime, tmp_path: Path
) -> None:
    """The leader exits on SIGTERM at once, a worker ignores it: the group is still cleaned."""
    pid_file = tmp_path / "grandchild.pid"
    code = """
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        open(os.environ["PID_FILE"] + ".tmp", "w").write(str(child.pid))
        os.replace(os.environ["PID_FILE"] + ".tmp", os.environ["PID_FILE"])
        time.sleep(60)
    """
    handle = await runtime.start(python_spec("leader", code, PID_FILE=str(pid_file)))
    grandchild = await read_pid(pid_file)

    await runtime.stop(handle, timeout=0.5)

    assert not process_alive(grandchild)


async def test_exit_status_is_reported(runtime: TrackingRuntime) -> None:
    handle = await runtime.start(python_spec("crash", "import sys; print('boom'); sys.exit(3)"))
    await wait_until(lambda: exited(runtime, handle), DEADLINE_S, what="the exit")
    assert await runtime.status(handle) == ServerStatus(running=False, returncode=3)
    assert await runtime.last_log_line(handle) == "boom"


async def test_restart_rotates_the_log(runtime: TrackingRuntime) -> None:
    first = await runtime.start(python_spec("r0", "print('first run')"))
    await wait_until(lambda: exited(runtime, first), DEADLINE_S, what="first run to end")
    await runtime.stop(first, timeout=1.0)
    second = await runtime.start(python_spec("r0", "print('second run')"))
    await wait_until(lambda: exited(runtime, second), DEADLINE_S, what="second run to end")

    assert second.log_path == first.log_path
    assert "second run" in second.log_path.read_text()
    assert "first run" not in second.log_path.read_text()
    assert "first run" in second.log_path.with_name("r0.log.1").read_text()


async def test_log_is_capped_while_the_server_runs(small_log_runtime: TrackingRuntime) -> None:
    rt = small_log_runtime
    code = """
        import sys, time
        for i in range(200):
            print(f"line {i:04d} " + "x" * 40, flush=True)
        print("tail line", flush=True)
        time.sleep(60)
    """
    handle = await rt.start(python_spec("chatty", code))
    await wait_until(
        lambda: last_line(handle.log_path) == "tail line", DEADLINE_S, what="all output"
    )

    await rt.status(handle)  # notices the size and rotates

    rotated = handle.log_path.with_name("chatty.log.1")
    assert "tail line" in rotated.read_text()
    assert handle.log_path.stat().st_size == 0
    assert await running(rt, handle)


async def test_missing_executable_raises_oserror(runtime: TrackingRuntime) -> None:
    spec = ReplicaSpec(
        name="nope", host="127.0.0.1", port=1, model="m", command=("/nonexistent/vllm",)
    )
    with pytest.raises(OSError):
        await runtime.start(spec)


def test_last_log_line_skips_blank_lines_and_colors(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(b"# vllm-fleet: r0: cmd\n\x1b[32mINFO loading\x1b[0m\r\n\n  \n")
    assert last_line(log) == "INFO loading"
    assert last_line(tmp_path / "missing.log") == ""
