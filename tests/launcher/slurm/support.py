"""Helpers of the SLURM tests: a job's script rendered like `vllm-fleet slurm` writes it."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from vllm_fleet.launcher.commands import slurm as slurm_command
from vllm_fleet.launcher.slurm.layout import NodesPlan
from vllm_fleet.launcher.slurm.script import render_script


def slurm_args(config: Path, *flags: str) -> argparse.Namespace:
    """`vllm-fleet slurm --config CONFIG FLAGS...` as parsed by the real parser."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    slurm_command.register(sub)
    return parser.parse_args(["slurm", "--config", str(config), *flags])


def render(config: Path, nodes: int, log_dir: Path, *flags: str) -> tuple[str, NodesPlan]:
    """The script and layout `vllm-fleet slurm --nodes NODES FLAGS` would write."""
    args = slurm_args(config, "--nodes", str(nodes), "-o", "unused.sbatch", *flags)
    fleet = slurm_command.config_from_args(args)
    layout, _ = slurm_command.plan_job(fleet, nodes, args.params)
    return render_script(slurm_command.job_spec(fleet, layout, log_dir)), layout


def shellcheck(path: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("shellcheck")
    assert tool, "shellcheck is missing: run `bash .ci/slurm-setup` (it installs it)"
    return subprocess.run(
        [tool, "--shell=bash", str(path)], capture_output=True, text=True, timeout=60
    )
