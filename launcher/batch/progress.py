"""What a batch tells its user while it runs and when it ends.

While it runs: a tqdm bar (done / total, tokens/s, ETA, errors) on a terminal or in Jupyter;
without a TTY (SLURM logs, CI, ``nohup``) one plain line every `PLAIN_INTERVAL_S` seconds, so a
log is readable and does not fill with carriage returns. At the end: `BatchSummary` (counts by
status, tokens in and out, throughput, latency p50 / p99), printed as text or as JSON.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

#: Seconds between plain progress lines (no TTY).
PLAIN_INTERVAL_S = 5.0
#: Latencies kept for the percentiles: a uniform reservoir sample, so memory is fixed.
RESERVOIR = 10_000


@dataclass
class BatchStats:
    """Counters the runner updates as results are written."""

    total: int = 0
    #: Ids an earlier run already finished (skipped this run).
    skipped: int = 0
    done: int = 0
    ok: int = 0
    failed: int = 0
    input_errors: int = 0
    retries: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    limit: int = 0
    started: float = field(default_factory=time.monotonic)
    _latencies: list[float] = field(default_factory=list, repr=False)
    _seen_latencies: int = field(default=0, repr=False)
    _rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False)

    def record(self, status: str, latency_s: float | None, ok: bool) -> None:
        self.done += 1
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        if latency_s is not None:
            self._seen_latencies += 1
            if len(self._latencies) < RESERVOIR:
                self._latencies.append(latency_s)
            else:
                slot = self._rng.randrange(self._seen_latencies)
                if slot < RESERVOIR:
                    self._latencies[slot] = latency_s

    def percentile(self, q: float) -> float | None:
        if not self._latencies:
            return None
        ordered = sorted(self._latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def errors(self) -> int:
        return self.failed + self.input_errors

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.skipped - self.done - self.input_errors)


@dataclass(frozen=True)
class BatchSummary:
    """What a finished (or interrupted) batch did. `run_batch` returns it; ``--json`` prints
    it."""

    total_lines: int
    skipped: int
    completed: int
    succeeded: int
    failed: int
    input_errors: int
    retries: int
    by_status: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    latency_p50_s: float | None
    latency_p99_s: float | None
    final_limit: int
    interrupted: bool
    output: str
    errors_file: str | None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def to_text(self) -> str:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_status.items())) or "none"

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.0f} ms"

        state = "interrupted (run the same command again to resume)" if self.interrupted else "done"
        return "\n".join(
            [
                f"batch {state}: {self.completed} answered ({self.succeeded} ok, {self.failed} "
                f"failed), {self.input_errors} bad input lines, {self.skipped} already done",
                f"  statuses: {statuses}; retries: {self.retries}",
                f"  tokens: {self.prompt_tokens} in, {self.completion_tokens} out; "
                f"{self.requests_per_s:.1f} req/s, {self.output_tokens_per_s:.0f} output tok/s "
                f"over {self.duration_s:.1f} s",
                f"  latency p50 {ms(self.latency_p50_s)}, p99 {ms(self.latency_p99_s)}; "
                f"final in-flight limit {self.final_limit}",
                f"  results: {self.output}"
                + (f" (failures: {self.errors_file})" if self.errors_file else ""),
            ]
        )


def summarize(
    stats: BatchStats, *, interrupted: bool, output: str, errors_file: str | None
) -> BatchSummary:
    duration = max(1e-9, time.monotonic() - stats.started)
    return BatchSummary(
        total_lines=stats.total,
        skipped=stats.skipped,
        completed=stats.done,
        succeeded=stats.ok,
        failed=stats.failed,
        input_errors=stats.input_errors,
        retries=stats.retries,
        by_status=dict(stats.by_status),
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        duration_s=round(duration, 3),
        requests_per_s=round(stats.done / duration, 3),
        output_tokens_per_s=round(stats.completion_tokens / duration, 3),
        latency_p50_s=stats.percentile(0.5),
        latency_p99_s=stats.percentile(0.99),
        final_limit=stats.limit,
        interrupted=interrupted,
        output=output,
        errors_file=errors_file,
    )


def _eta(stats: BatchStats, elapsed: float) -> str:
    if stats.done == 0 or elapsed <= 0:
        return "?"
    seconds = int(stats.remaining / (stats.done / elapsed))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


def plain_line(stats: BatchStats, now: float) -> str:
    """The no-TTY progress line: everything on one line, fixed order, grep-able."""
    elapsed = now - stats.started
    finished = stats.done + stats.skipped + stats.input_errors
    share = 100.0 * finished / stats.total if stats.total else 100.0
    tok_s = stats.completion_tokens / elapsed if elapsed > 0 else 0.0
    return (
        f"batch: {finished}/{stats.total} ({share:.1f}%) ok {stats.ok} errors {stats.errors} "
        f"{tok_s:.0f} tok/s in-flight {stats.in_flight}/{stats.limit} ETA {_eta(stats, elapsed)}"
    )


class Progress:
    """A tqdm bar (terminal, Jupyter) or plain lines (no TTY), or nothing (``quiet``)."""

    def __init__(
        self, stats: BatchStats, *, stream: TextIO | None = None, quiet: bool = False
    ) -> None:
        self._stats = stats
        self._stream = stream or sys.stderr
        self._quiet = quiet
        self._bar: Any = None
        self._last_line = 0.0
        self._shown = 0
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)()) or _in_notebook()

    def start(self) -> None:
        if self._quiet or not self._tty:
            return
        # tqdm ships no type stubs; imported lazily so plain-line runs never load it.
        tqdm = importlib.import_module("tqdm.auto").tqdm
        self._bar = tqdm(
            total=self._stats.total, initial=0, unit="req", file=self._stream, dynamic_ncols=True
        )

    def refresh(self, now: float) -> None:
        stats = self._stats
        if self._quiet:
            return
        if self._bar is not None:
            finished = stats.done + stats.skipped + stats.input_errors
            self._bar.update(finished - self._shown)
            self._shown = finished
            elapsed = now - stats.started
            tok_s = stats.completion_tokens / elapsed if elapsed > 0 else 0.0
            self._bar.set_postfix(
                {"tok/s": f"{tok_s:.0f}", "errors": stats.errors, "in-flight": stats.in_flight},
                refresh=False,
            )
            return
        if now - self._last_line >= PLAIN_INTERVAL_S:
            self._last_line = now
            print(plain_line(stats, now), file=self._stream, flush=True)

    def close(self, now: float) -> None:
        if self._bar is not None:
            self.refresh(now)
            self._bar.close()
            self._bar = None
        elif not self._quiet:
            print(plain_line(self._stats, now), file=self._stream, flush=True)


def _in_notebook() -> bool:
    """True inside Jupyter, where tqdm.auto draws a widget even though stderr is no TTY."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    get = getattr(shell, "get_ipython", None)
    instance = get() if get is not None else None
    return instance is not None and type(instance).__name__ == "ZMQInteractiveShell"
