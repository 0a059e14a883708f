"""Where the router's samples went: py-spy's collapsed stacks summed by function (issue 18).

    bench/.env/bin/python -m bench.dataplane_profile /tmp/prof/stream-0.txt [--top 40]

Each line of py-spy's ``--format raw`` output is ``frame;frame;...;frame count``; a frame is
``function (file:line)``. Self time is what a function's own frame held at the top of the
stack, inclusive time any sample it was on. Idle samples (the event loop waiting in
``select``/``epoll``) are reported apart, so shares are of the busy samples.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>\S+) \((?P<file>[^:]+)(?::\d+)?\)$")
#: Leaf frames of a loop waiting for I/O (the standard loop's selector; py-spy leaves out
#: uvloop's waits itself unless --native, where epoll_pwait shows up as busy).
_IDLE = ("select (lib/selectors.py)", "poll (lib/selectors.py)", "epoll_pwait (libc.so.6)")


def _name(frame: str) -> str:
    """``function (file)`` without the line number, the file shortened to its last parts."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = "/".join(Path(match["file"]).parts[-2:])
    return f"{match['func']} ({file})"


def summarize(path: Path, top: int) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += count
        if frames[-1] in _IDLE:
            idle += count
            continue
        self_time[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    busy = max(1, total - idle)
    out = [f"{path.name}: {total} samples, {idle} idle ({100 * idle / max(1, total):.0f}%)"]
    out.append(f"-- self (% of {busy} busy samples)")
    out += [f"{100 * n / busy:5.1f}%  {name}" for name, n in self_time.most_common(top)]
    out.append("-- inclusive")
    out += [f"{100 * n / busy:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dataplane_profile")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    for file in args.files:
        print(summarize(file, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
