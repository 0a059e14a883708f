"""Running `vllm-fleet batch` as users do, for tests and the bench: one command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def batch_argv(source: Path, output: Path, endpoint: str, *extra: str) -> list[str]:
    """`python -m vllm_fleet.launcher.cli batch SOURCE -o OUTPUT --endpoint URL --json --quiet`
    plus ``extra`` flags."""
    argv = [sys.executable, "-m", "vllm_fleet.launcher.cli", "batch", str(source)]
    return [*argv, "-o", str(output), "--endpoint", endpoint, "--json", "--quiet", *extra]


def run_batch_command(
    source: Path, output: Path, endpoint: str, *extra: str, timeout_s: float = 600.0
) -> subprocess.CompletedProcess[str]:
    """`batch_argv` run to the end; the caller checks the return code."""
    argv = batch_argv(source, output, endpoint, *extra)
    return subprocess.run(
        argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout_s, check=False
    )
