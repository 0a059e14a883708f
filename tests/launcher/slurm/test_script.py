"""The sbatch script of both shapes: valid bash, ShellCheck clean, #SBATCH lines from the flags
and settings, and the commands the planner gives (never a command line of its own)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from tests.launcher.slurm.support import render, shellcheck
from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.slurm.script import SIGNAL_LEAD_S
from vllm_fleet.launcher.vllm_args import SERVER_MODULE


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def _check_shell(tmp_path: Path, script: str) -> None:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    lint = shellcheck(path)
    assert lint.returncode == 0, lint.stdout


def _sbatch(script: str) -> list[str]:
    return [
        line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")
    ]


def _unwrapped(script: str) -> str:
    return script.replace(" \\\n    ", " ").replace(" \\\n        ", " ")


GPU_FLEET = "model: org/m\nparams: null\n"


def test_shape_one_is_valid_shell_with_the_flags_as_sbatch_lines(tmp_path: Path) -> None:
    config = _config(tmp_path, "model: org/m\ngpus: 8x80GB\nslurm: {qos: normal}\n")
    flags = ("--partition", "gpu", "--time", "4:00:00", "--account", "proj", "--constraint",
             "h100&ib", "--exclusive", "--env", "HF_HOME=/scratch/hf", "--setup",
             "module load cuda/12.4", "--params", "8B")  # fmt: skip

    script, layout = render(config, 4, tmp_path / "logs", *flags)

    _check_shell(tmp_path, script)
    assert layout.shape == "replicas"
    assert _sbatch(script) == [
        "--job-name=vllm-fleet", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
        "--partition=gpu", "--time=4:00:00", "--account=proj", "--qos=normal",
        "--constraint=h100&ib", "--exclusive", f"--output={tmp_path / 'logs'}/%j.log",
        f"--signal=B:TERM@{SIGNAL_LEAD_S}",
    ]  # fmt: skip
    assert "module load cuda/12.4\nexport HF_HOME=/scratch/hf\n" in script
    # every node runs `up` with the planned replica count; the router fronts them all.
    per_node = len(layout.node_plan.replicas)
    assert per_node == 8
    assert f"replicas: {per_node}\n" in script
    assert f'--ports "$REPLICA_PORT" {per_node}' in script
    assert f"--replicas {4 * per_node}" in script
    assert "scontrol show hostnames" in script
    # the vLLM command line is built on the node by `up`, from the planner, not here.
    assert SERVER_MODULE not in script


def test_shape_two_runs_the_planners_command_across_nodes_with_ray(tmp_path: Path) -> None:
    config = _config(tmp_path, "model: org/m\ngpus: 4x24GB\n")

    script, layout = render(config, 4, tmp_path, "--params", "70B", "--time", "60")

    _check_shell(tmp_path, script)
    assert layout.shape == "ray"
    assert "--gpus-per-node=4" in _sbatch(script)
    argv = layout.engine.command
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "4"
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    # the script runs exactly that argv, with the job's port and Python.
    words = list(argv)
    words[0] = '"$PY"'
    words[words.index("--port") + 1] = '"$ENGINE_PORT"'
    command = " ".join(w if w.startswith('"') else shlex.quote(w) for w in words)
    assert command in _unwrapped(script)
    assert 'VLLM_HOST_IP="$HEAD_IP"' in script
    # the head, then a readiness poll, then the workers, then a poll for every node.
    order = [
        "fleet-ray-head", "ray-wait --address \"$HEAD_IP:$RAY_PORT\" --nodes 1",
        "fleet-ray-workers", "--nodes 4", "fleet-engine",
    ]  # fmt: skip
    flat = _unwrapped(script)
    flat = flat[flat.index("# --- shape 2") :]
    positions = [flat.index(mark) for mark in order]
    assert positions == sorted(positions)
    commands = [line for line in flat.splitlines() if not line.lstrip().startswith("#")]
    assert [line for line in commands if "sleep" in line] == []


def test_the_trap_stops_router_then_engine_then_ray(tmp_path: Path) -> None:
    script, _ = render(_config(tmp_path, "model: org/m\ngpus: 4x24GB\n"), 2, tmp_path,
                       "--params", "70B")  # fmt: skip

    stops = [
        line.split()[2] for line in script.splitlines() if line.strip().startswith('stop_step "$')
    ]

    assert stops == ["fleet-router", "fleet-engine", "fleet-ray-workers", "fleet-ray-head"]
    graces = [int(line.split()[3]) for line in script.splitlines() if 'stop_step "$' in line]
    assert sum(graces) < SIGNAL_LEAD_S  # the whole stop fits before the time limit
    assert "trap cleanup EXIT" in script


@pytest.mark.parametrize(
    ("runtime", "marks"),
    [
        ("apptainer", ['apptainer exec --nv --bind "$LOG_DIR" /img/vllm.sif']),
        ("pyxis", ["--container-image=/img/vllm.sif", '--container-mounts="$LOG_DIR"']),
    ],
)
def test_containers_wrap_every_step(tmp_path: Path, runtime: str, marks: list[str]) -> None:
    config = _config(
        tmp_path, f"model: org/m\ngpus: 2x80GB\nslurm: {{container_runtime: {runtime}}}\n"
    )

    script, _ = render(config, 2, tmp_path, "--params", "8B", "--container", "/img/vllm.sif")

    _check_shell(tmp_path, script)
    for mark in marks:
        assert mark in script
    assert "PY=python3\n" in script


def test_batch_runs_the_batch_command_against_the_jobs_router(tmp_path: Path) -> None:
    from tests.launcher.slurm.support import slurm_args
    from vllm_fleet.launcher.commands import slurm as slurm_command
    from vllm_fleet.launcher.slurm.script import render_script

    config = _config(tmp_path, "engine: sim\n")
    args = slurm_args(config, "--nodes", "1", "--batch", "in.jsonl", "-o", "out.jsonl")
    fleet = slurm_command.config_from_args(args)
    layout, _ = slurm_command.plan_job(fleet, 1)

    script = render_script(
        slurm_command.job_spec(fleet, layout, tmp_path, ("/d/in.jsonl", "/d/out.jsonl"))
    )

    _check_shell(tmp_path, script)
    assert '"$PY" -m vllm_fleet.launcher.cli batch /d/in.jsonl --output /d/out.jsonl' in _unwrapped(
        script
    )
    assert "FINAL_STATE=completed" in script


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--time", "4 hours"), "--time: must be a SLURM time limit"),
        (("--partition", "gpu;rm"), "--partition: must be one word"),
        (("--env", "NOPE"), "--env 'NOPE': expected NAME=VALUE"),
        (("--gpus-per-node", "4"), "--gpus-per-node 4 differs from --gpus (8 GPUs"),
        (("--container-runtime", "docker"), "--container-runtime: expected one of"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(
    tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    config = _config(tmp_path, "model: org/m\ngpus: 8x80GB\n")
    with pytest.raises(ConfigError) as info:
        render(config, 2, tmp_path, "--params", "8B", *flags)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{env: {'A B': x}}", "slurm.env: 'A B' is not a variable name"),
        ("{extra_sbatch: ['mem=0']}", "slurm.extra_sbatch: 'mem=0' is not an sbatch option"),
        ("{exclusive: maybe}", "slurm.exclusive: expected true/false"),
    ],
)
def test_bad_slurm_settings_name_the_key(tmp_path: Path, section: str, message: str) -> None:
    config = _config(tmp_path, f"engine: sim\nslurm: {section}\n")
    with pytest.raises(ConfigError, match=message):
        render(config, 1, tmp_path)


def test_a_typo_in_the_slurm_section_names_the_key(tmp_path: Path) -> None:
    config = _config(tmp_path, "model: org/m\nslurm: {partion: gpu}\n")
    with pytest.raises(ConfigError, match=r"slurm.partion: unknown key \(did you mean 'partition'"):
        render(config, 1, tmp_path)
