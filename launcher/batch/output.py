"""The result files: append-only, durable every second, and the memory of what is done.

Why append-only: a result is written once, when it finishes, and never rewritten, so an
interrupted job (Ctrl-C, SIGTERM, ``kill -9``, a lost node) leaves every line it wrote intact.
A kill can tear only the last line (a partial write); `scan_results` drops it on the next run,
and the next run appends after the last whole line.

Why hashes: resuming skips every ``custom_id`` that already has a final line. Keeping the ids
themselves would grow with the file (a million ids of 40 characters is ~100 MB of Python
strings); keeping a 60-bit hash of each is ~60 bytes an id in a Python set (int object
plus hash-table slot), ~60 MB for a million. Two different ids share a hash with probability
about n^2 / 2^61 (4e-7 for a million ids); the cost of that would be one line skipped.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from vllm_fleet.launcher.batch.input import loads

#: Results are flushed to the OS and fsynced at least this often (seconds).
SYNC_INTERVAL_S = 1.0
#: How far back from the end a torn last line is looked for, per read.
_TAIL_CHUNK = 1 << 16
_ENCODER = msgspec.json.Encoder()
#: 60 bits: Python keeps ints below 2^60 in its smallest multi-digit object (32 bytes).
_HASH_MASK = (1 << 60) - 1


def id_hash(custom_id: str) -> int:
    """Python's own string hash (SipHash, 64 bits), cut to 60. It is salted per process, which
    is fine: the set is rebuilt from the result files by every run, never stored."""
    return hash(custom_id) & _HASH_MASK


class IdSet:
    """A set of custom_ids kept as 60-bit hashes (see the module docstring for the bound)."""

    def __init__(self) -> None:
        self._hashes: set[int] = set()

    def add(self, custom_id: str) -> None:
        self._hashes.add(id_hash(custom_id))

    def __contains__(self, custom_id: object) -> bool:
        return isinstance(custom_id, str) and id_hash(custom_id) in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)


@dataclass
class ResumeState:
    """What earlier runs finished: ids with a final line, and input lines already reported bad
    (they have no usable id)."""

    finished: IdSet = field(default_factory=IdSet)
    reported_lines: set[int] = field(default_factory=set)
    #: Whole lines read back; torn last lines dropped (at most one a file).
    lines: int = 0
    torn: int = 0


def drop_torn_tail(path: Path) -> bool:
    """Truncate a last line that has no newline (a write cut by a kill). True when one was."""
    with path.open("r+b") as handle:
        end = handle.seek(0, os.SEEK_END)
        if end == 0:
            return False
        handle.seek(end - 1)
        if handle.read(1) == b"\n":
            return False
        position = end
        while position > 0:
            start = max(0, position - _TAIL_CHUNK)
            handle.seek(start)
            block = handle.read(position - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                handle.truncate(start + newline + 1)
                return True
            position = start
        handle.truncate(0)
        return True


def scan_results(paths: list[Path], state: ResumeState | None = None) -> ResumeState:
    """Read earlier results back (dropping torn last lines first) into a `ResumeState`."""
    state = state or ResumeState()
    for path in paths:
        if not path.exists():
            continue
        state.torn += drop_torn_tail(path)
        with path.open("rb") as handle:
            for raw in handle:
                try:
                    record = loads(raw)
                except ValueError:
                    continue  # not ours: a line we could not have written; leave it be
                if not isinstance(record, dict):
                    continue
                state.lines += 1
                custom_id = record.get("custom_id")
                if isinstance(custom_id, str):
                    state.finished.add(custom_id)
                    continue
                error = record.get("error")
                line = error.get("line") if isinstance(error, dict) else None
                if isinstance(line, int):
                    state.reported_lines.add(line)
    return state


def result_record(
    custom_id: str | None,
    *,
    status_code: int | None = None,
    request_id: str | None = None,
    body: Any = None,
    error_code: str | None = None,
    message: str | None = None,
    line: int | None = None,
) -> dict[str, Any]:
    """One line of the OpenAI batch output format: ``response`` when the server answered (any
    status), ``error`` when it never did (connection, timeout) or the input line was bad."""
    record: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id}
    if status_code is not None:
        record["response"] = {"status_code": status_code, "request_id": request_id, "body": body}
        record["error"] = None
    else:
        error: dict[str, Any] = {"code": error_code or "error", "message": message or ""}
        if line is not None:
            error["line"] = line
        record["response"] = None
        record["error"] = error
    return record


def is_failure(record: dict[str, Any]) -> bool:
    response = record.get("response")
    if record.get("error") is not None or not isinstance(response, dict):
        return True
    status = response.get("status_code")
    return not (isinstance(status, int) and 200 <= status < 300)


class ResultWriter:
    """Appends result lines to the output file (failures to ``errors`` when given, as OpenAI's
    error file), flushed and fsynced at least every `SYNC_INTERVAL_S` by `maybe_sync`."""

    def __init__(
        self, output: Path, errors: Path | None = None, sync_interval_s: float = SYNC_INTERVAL_S
    ) -> None:
        self._output = self._open(output)
        self._errors = self._open(errors) if errors is not None else None
        self._interval = sync_interval_s
        self._last_sync = time.monotonic()
        self._dirty = False
        self.written = 0

    @staticmethod
    def _open(path: Path) -> BinaryIO:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("ab", buffering=1 << 16)

    def write(self, record: dict[str, Any]) -> None:
        """One whole line in one write: a kill tears at most the line being written."""
        line = _ENCODER.encode(record) + b"\n"
        target = self._errors if self._errors is not None and is_failure(record) else self._output
        target.write(line)
        self._dirty = True
        self.written += 1

    def due(self, now: float) -> bool:
        return self._dirty and now - self._last_sync >= self._interval

    def flush(self) -> list[int]:
        """Hand buffered lines to the OS; returns the descriptors to fsync."""
        descriptors = []
        for handle in (self._output, self._errors):
            if handle is not None:
                handle.flush()
                descriptors.append(handle.fileno())
        self._last_sync = time.monotonic()
        self._dirty = False
        return descriptors

    def sync(self) -> None:
        """Flush and fsync both files, blocking (at the end of a run)."""
        for descriptor in self.flush():
            os.fsync(descriptor)

    def maybe_sync(self, now: float | None = None) -> None:
        if self.due(time.monotonic() if now is None else now):
            self.sync()

    async def maybe_sync_async(self) -> None:
        """`maybe_sync` with the fsync on a worker thread: a slow disk must not stall the
        requests (the lines are already flushed to the OS, so appends go on meanwhile)."""
        if self.due(time.monotonic()):
            for descriptor in self.flush():
                await asyncio.to_thread(os.fsync, descriptor)

    def close(self) -> None:
        self.sync()
        for handle in (self._output, self._errors):
            if handle is not None:
                handle.close()
