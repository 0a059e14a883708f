"""The code-quality gates run as part of the suite, so CI fails on them like on any test."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_lint_is_clean() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


#: The two mypy runs take ~100 s each on CI's 2-core machine and use one core each; they start
#: together (their caches are apart: .mypy_cache/3.11 and .mypy_cache/3.10) and each test
#: waits for its own. Sequential, they were 197 of CI's ~1,560 s of tests.
MYPY_RUNS = {
    "strict": ("mypy",),
    # pyproject.toml says requires-python >= 3.10, and CI runs 3.11: checked against 3.10's
    # standard library, a 3.11-only call (asyncio.timeout, once in router/peers.py) fails here
    # rather than on a user's machine.
    "oldest python": (
        "mypy",
        "--python-version",
        "3.10",
        "-p",
        "vllm_fleet.router",
        "-p",
        "vllm_fleet.launcher",
    ),
}


@pytest.fixture(scope="module")
def mypy_runs() -> Iterator[dict[str, subprocess.Popen[str]]]:
    runs = {
        name: subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, args in MYPY_RUNS.items()
    }
    try:
        yield runs
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
            run.communicate()


def _finished(run: subprocess.Popen[str]) -> tuple[int, str]:
    output, _ = run.communicate(timeout=600)
    return run.returncode, output


def test_mypy_strict_is_clean(mypy_runs: dict[str, subprocess.Popen[str]]) -> None:
    code, output = _finished(mypy_runs["strict"])
    assert code == 0, output


def test_mypy_strict_is_clean_on_the_oldest_python_the_package_declares(
    mypy_runs: dict[str, subprocess.Popen[str]],
) -> None:
    code, output = _finished(mypy_runs["oldest python"])
    assert code == 0, output
