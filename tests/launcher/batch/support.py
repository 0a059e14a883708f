"""Helpers for the batch tests: input files, reading results, running the CLI as a child."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support.sim import REPO_ROOT, SIM_MODEL


def write_batch(path: Path, count: int, max_tokens: int = 16, model: str = SIM_MODEL) -> list[str]:
    """An OpenAI Batch file of `count` chat requests; returns their custom_ids."""
    ids = [f"req-{n:07d}" for n in range(count)]
    with path.open("w") as handle:
        for custom_id in ids:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"say something about {custom_id}"}],
                "max_tokens": max_tokens,
            }
            line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
            handle.write(json.dumps({**line, "body": body}) + "\n")
    return ids


def read_results(*paths: Path) -> list[dict[str, Any]]:
    """Every line of the result files; fails on a line that is not a JSON object."""
    records: list[dict[str, Any]] = []
    for path in paths:
        if not path.exists():
            continue
        for number, text in enumerate(path.read_text().splitlines(), start=1):
            record = json.loads(text)
            assert isinstance(record, dict), f"{path}:{number} is not an object"
            records.append(record)
    return records


def answered_once(records: list[dict[str, Any]], ids: list[str]) -> Counter[str]:
    """Asserts each id has exactly one line; returns the count of lines per status."""
    per_id = Counter(r["custom_id"] for r in records if r["custom_id"] is not None)
    repeated = {k: v for k, v in per_id.items() if v > 1}
    assert not repeated, f"ids answered more than once: {list(repeated)[:5]}"
    missing = set(ids) - set(per_id)
    assert not missing, f"{len(missing)} ids unanswered, e.g. {sorted(missing)[:5]}"
    return Counter(
        str(r["response"]["status_code"]) if r["response"] else r["error"]["code"]
        for r in records
        if r["custom_id"] is not None
    )


def line_count(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def batch_child(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m vllm_fleet.launcher.cli batch ARGS` in its own process group, output to `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vllm_fleet.launcher.cli", "batch", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
