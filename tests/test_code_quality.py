"""The code-quality gates run as part of the suite, so CI fails on them like on any test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_mypy_strict_is_clean() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean_on_the_oldest_python_the_package_declares() -> None:
    """pyproject.toml says requires-python >= 3.10, and CI runs 3.11: checked against 3.10's
    standard library, a 3.11-only call (asyncio.timeout, once in router/peers.py) fails here
    rather than on a user's machine."""
    package = ["-p", "vllm_fleet.router", "-p", "vllm_fleet.launcher"]
    result = _run("mypy", "--python-version", "3.10", *package)
    assert result.returncode == 0, result.stdout + result.stderr
