"""CPU accounting from /proc: what a router's process tree used, what the benchmark and the
rest of the machine used while a scenario ran (other programs' CPU skews every number)."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of `pid` and all its live descendants (nginx/HAProxy work in children)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid = int(fields[1])
        children.setdefault(ppid, []).append(int(entry.name))
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        total += times.get(current, 0.0)
        stack.extend(children.get(current, ()))
    return total


def own_cpu_seconds() -> float:
    """CPU of this process plus every child it has reaped (and theirs): the benchmark's own."""
    stat = Path("/proc/self/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (
        sum(int(f) for f in fields[11:15]) / CLOCK_TICKS
        + tree_cpu_seconds(os.getpid())
        - (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    )


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat), to see what else ran."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLOCK_TICKS
