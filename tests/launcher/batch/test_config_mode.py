"""`vllm-fleet batch --config fleet.yaml`: the fleet is started for the batch and stopped after
it (simulated engines, so no model is needed)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.launcher.batch.support import answered_once, read_results, write_batch
from tests.support.ports import free_port, free_port_run
from tests.support.sim import REPO_ROOT


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except OSError:
        return False
    return True


def test_config_starts_the_fleet_runs_the_batch_and_stops_it(tmp_path: Path) -> None:
    base, router_port = free_port_run(2), free_port()
    config = tmp_path / "fleet.yaml"
    config.write_text(
        f"model: sim-model\nengine: sim\nreplicas: 2\nbase_port: {base}\n"
        f"router: {{port: {router_port}}}\n"
    )
    ids = write_batch(tmp_path / "in.jsonl", 40, max_tokens=8)
    output = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "vllm_fleet.launcher.cli", "batch", str(tmp_path / "in.jsonl")]
    argv += ["-o", str(output), "--config", str(config), "--json", "--quiet"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["succeeded"] == 40
    assert answered_once(read_results(output), ids) == {"200": 40}
    assert (tmp_path / "out.jsonl.fleet").is_dir()  # the fleet's run directory, logs kept
    for port in (base, base + 1, router_port):
        assert not listening(port), f"port {port} still answers: the fleet was not stopped"
