"""The shape is the planner's: replicas on every node when the model fits one node, else one
server across nodes whose stages fit by the planner's own memory model."""

from __future__ import annotations

import pytest

from vllm_fleet.launcher.inventory import parse_declared
from vllm_fleet.launcher.model_size import size_model
from vllm_fleet.launcher.planner import PlanError, PlanOptions, plan
from vllm_fleet.launcher.slurm.layout import plan_nodes


def test_a_model_that_fits_a_node_is_the_single_node_plan_on_every_node() -> None:
    inventory = parse_declared("8x80GB")
    model = size_model("m", params="8B")
    options = PlanOptions(model="m")

    layout = plan_nodes(inventory, model, options, nodes=3)

    assert layout.shape == "replicas"
    assert layout.node_plan == plan(inventory, model, options)
    assert layout.replicas_per_node == 8
    assert "3 node(s) x 8 replica(s) (TP1) = 24 replicas" in layout.describe()


def test_a_model_too_big_for_a_node_spans_nodes_with_tp_per_node_and_pp_over_nodes() -> None:
    inventory = parse_declared("4x24GB")
    model = size_model("m", params="70B")
    options = PlanOptions(model="m")
    with pytest.raises(PlanError):
        plan(inventory, model, options)

    layout = plan_nodes(inventory, model, options, nodes=3)

    argv = layout.engine.command
    assert layout.shape == "ray"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "3"
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert any("2 pipeline stage(s) would, 3 are used" in note for note in layout.notes)


def test_too_few_nodes_name_the_count_that_fits() -> None:
    with pytest.raises(PlanError, match="needs --nodes 2"):
        plan_nodes(
            parse_declared("4x24GB"), size_model("m", params="70B"), PlanOptions(model="m"), 1
        )


def test_pipeline_flags_are_the_layouts_not_extra_arguments() -> None:
    options = PlanOptions(model="m", extra_args=("--pipeline-parallel-size=2",))
    with pytest.raises(PlanError, match="set by the SLURM layout"):
        plan_nodes(parse_declared("8x80GB"), None, options, 2)


def test_plan_nodes_prints_the_shape_and_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    from vllm_fleet.launcher.cli import main

    status = main(["plan", "--model", "m", "--params", "70B", "--gpus", "4x24GB", "--nodes", "2"])

    out = capsys.readouterr().out
    assert status == 0
    assert out.startswith(
        "Shape 2 (ray): one vllm server across 2 nodes, tensor parallel 4 per node"
    )
    assert "--pipeline-parallel-size 2 --distributed-executor-backend ray" in out
