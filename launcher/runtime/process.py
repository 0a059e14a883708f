"""Run each replica as a local process group, with its output in a rotated log file.

Every replica gets its own session (``start_new_session=True``) so that one signal to the group
reaches vLLM's worker processes too: stopping the leader alone would orphan them and keep the
GPUs busy. Output goes straight to a file (not through a pipe) so a server keeps running while
the supervisor restarts, and the log survives the supervisor for post-mortems.

The runtime methods never block the supervisor's loop: servers are started with asyncio's
subprocess support (asyncio reaps them), waiting for a group to exit sleeps with asyncio, and
the two calls that can take long (scanning /proc for a group's members, copying a large log
aside) run in a thread. ``stop_process_group`` stays synchronous for ``vllm-fleet down``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from vllm_fleet.launcher.plan_types import ServerSpec
from vllm_fleet.launcher.runtime.base import ServerHandle, ServerStatus

#: first line of every log, so a log can be matched to its command; not shown as progress.
HEADER_PREFIX = "# vllm-fleet:"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_TAIL_BYTES = 8192
#: after its group is gone, how long the leader may take to be reaped (asyncio does it at once).
REAP_TIMEOUT_S = 10.0


class ProcessRuntime:
    def __init__(
        self,
        log_dir: Path,
        max_log_bytes: int = 50 * 1024 * 1024,
        log_backups: int = 3,
        poll_interval_s: float = 0.05,
    ) -> None:
        self.log_dir = log_dir
        self.max_log_bytes = max_log_bytes
        self.log_backups = log_backups
        self.poll_interval_s = poll_interval_s
        self._procs: dict[int, asyncio.subprocess.Process] = {}

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    async def start(self, spec: ServerSpec) -> ServerHandle:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_path(spec.name)
        rotate_log(path, self.log_backups)
        env = process_env(spec)
        with open(path, "ab") as log:
            log.write(f"{HEADER_PREFIX} {spec.name}: {' '.join(spec.command)}\n".encode())
            log.flush()
            proc = await asyncio.create_subprocess_exec(
                *spec.command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs[proc.pid] = proc
        return ServerHandle(spec=spec, pgid=proc.pid, log_path=path, started_at=time.monotonic())

    async def status(self, handle: ServerHandle) -> ServerStatus:
        """Also caps the log size: the supervisor polls this regularly, so it is the natural
        moment to notice a log that grew past ``max_log_bytes`` without another timer."""
        await self._cap_log(handle.log_path)
        pgid = _pgid(handle)
        proc = self._procs.get(pgid)
        if proc is None:
            return ServerStatus(running=process_alive(pgid))
        code = proc.returncode
        return ServerStatus(running=code is None, returncode=code)

    async def stop(self, handle: ServerHandle, timeout: float) -> ServerStatus:
        pgid = _pgid(handle)
        proc = self._procs.get(pgid)
        await stop_process_group_async(pgid, timeout, self.poll_interval_s)
        code = None
        if proc is not None:
            # the group is gone, so the leader has exited: asyncio reaps it at once.
            with contextlib.suppress(asyncio.TimeoutError):
                code = await asyncio.wait_for(proc.wait(), REAP_TIMEOUT_S)
        self._procs.pop(pgid, None)
        return ServerStatus(running=False, returncode=code)

    async def last_log_line(self, handle: ServerHandle) -> str:
        """Reads at most the last 8 KiB of a local file: cheap enough for the loop."""
        return last_line(handle.log_path)

    async def _cap_log(self, path: Path) -> None:
        try:
            size = path.stat().st_size
        except OSError:
            return
        if size > self.max_log_bytes:
            await asyncio.to_thread(copy_truncate, path, self.log_backups)


def process_env(spec: ServerSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if spec.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in spec.gpus)
    env.update(spec.env)
    return env


def _pgid(handle: ServerHandle) -> int:
    if handle.pgid is None:
        raise ValueError(f"{handle.spec.name}: not a process of this runtime ({handle.describe()})")
    return handle.pgid


def rotate_log(path: Path, backups: int) -> None:
    """``x.log`` -> ``x.log.1`` -> ... -> ``x.log.N`` (oldest dropped), like RotatingFileHandler."""
    if not path.exists():
        return
    if backups <= 0:
        path.unlink()
        return
    _shift_backups(path, backups)
    os.replace(path, path.with_name(f"{path.name}.1"))


def copy_truncate(path: Path, backups: int) -> None:
    """Rotate a log the running server still holds open (opened O_APPEND, so after the
    truncate its writes land at the new start). Lines written during the copy can be lost."""
    if backups > 0:
        _shift_backups(path, backups)
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    os.truncate(path, 0)


def _shift_backups(path: Path, backups: int) -> None:
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))


def last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    for line in reversed(re.split(r"[\r\n]+", tail)):
        clean = _ANSI.sub("", line).strip()
        if clean and not clean.startswith(HEADER_PREFIX):
            return clean
    return ""


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie holds no GPU and no port)."""
    state = _proc_state(pid)
    if state is not None:
        return state != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from /proc.

    Zombies are ignored because an init that never reaps (common in containers) would otherwise
    make a group look alive forever.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            return [pgid]
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and fields[0] != "Z" and fields[2] == str(pgid):
            members.append(int(entry.name))
    return members


def signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_process_group(
    pgid: int,
    timeout: float,
    poll_interval_s: float = 0.05,
    reap: subprocess.Popen[bytes] | None = None,
) -> bool:
    """SIGTERM the group, wait up to ``timeout``, then SIGKILL whatever is left.

    Returns True when it had to SIGKILL. ``reap`` is our own child (the group leader): it must
    be waited for or it stays a zombie in the group.
    """
    signal_group(pgid, signal.SIGTERM)
    if _wait_group_gone(pgid, timeout, poll_interval_s, reap):
        return False
    signal_group(pgid, signal.SIGKILL)
    _wait_group_gone(pgid, 10.0, poll_interval_s, reap)
    return True


def _wait_group_gone(
    pgid: int, timeout: float, poll_interval_s: float, reap: subprocess.Popen[bytes] | None
) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if reap is not None:
            reap.poll()
        if not group_members(pgid):
            if reap is not None:
                reap.wait()
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_interval_s)


async def stop_process_group_async(
    pgid: int, timeout: float, poll_interval_s: float = 0.05
) -> bool:
    """``stop_process_group`` for the supervisor's loop: the waits sleep with asyncio and each
    /proc scan runs in a thread. The leader is reaped by asyncio (it started it)."""
    signal_group(pgid, signal.SIGTERM)
    if await _wait_group_gone_async(pgid, timeout, poll_interval_s):
        return False
    signal_group(pgid, signal.SIGKILL)
    await _wait_group_gone_async(pgid, 10.0, poll_interval_s)
    return True


async def _wait_group_gone_async(pgid: int, timeout: float, poll_interval_s: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if not await asyncio.to_thread(group_members, pgid):
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(poll_interval_s)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, ..."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _proc_state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None
