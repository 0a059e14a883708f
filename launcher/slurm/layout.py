"""The job's shape over N nodes, decided by the planner (pure: no I/O, like ``plan``).

1. **replicas** (data parallel): the model fits on one node, so every node runs the plan
   ``plan()`` makes for one node's GPUs (`vllm-fleet up` there), and one router fronts the
   replicas of all nodes. Nodes multiply replicas; nothing crosses a node.
2. **ray** (one model across nodes): it does not fit on one node, so one vLLM server spans the
   nodes: tensor parallel over each node's GPUs, pipeline parallel over the nodes, Ray as the
   executor. Whether N stages fit is the planner's own memory model asked about one stage: a
   model with 1/N of the weights and of the KV cache per token on one node at TP = GPUs per node
   (a pipeline stage holds 1/N of the layers). The command line is the planner's
   (``vllm_fleet.launcher.vllm_args`` through ``plan``) with the pipeline and executor flags added.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from vllm_fleet.launcher.plan_multi_node import MAX_HINT_NODES
from vllm_fleet.launcher.plan_types import Inventory, ModelSize, Plan, ReplicaSpec
from vllm_fleet.launcher.planner import PlanError, PlanOptions, plan

Shape = Literal["replicas", "ray"]

#: flags the ray shape sets on the planner's command; the user may not pass them as extras.
RAY_OWNED_FLAGS = ("--pipeline-parallel-size", "-pp", "--distributed-executor-backend")


@dataclass(frozen=True)
class NodesPlan:
    """What runs on the job's nodes."""

    shape: Shape
    nodes: int
    gpus_per_node: int
    #: replicas: the plan every node runs. ray: the one server (its replica-0 is the command the
    #: head node runs, spanning all nodes).
    node_plan: Plan
    notes: tuple[str, ...] = ()

    @property
    def replicas_per_node(self) -> int:
        return len(self.node_plan.replicas) if self.shape == "replicas" else 0

    @property
    def engine(self) -> ReplicaSpec:
        """The multi-node server of the ray shape (the first replica of the replicas shape)."""
        return self.node_plan.replicas[0]

    def describe(self) -> str:
        """One line for `plan --nodes` and the script's header."""
        if self.shape == "replicas":
            per = self.replicas_per_node
            tp = self.node_plan.tensor_parallel_size
            return (
                f"Shape 1 (replicas): {self.nodes} node(s) x {per} replica(s) "
                f"(TP{tp}) = {self.nodes * per} replicas behind one router on the first node"
            )
        if self.node_plan.engine == "sim":
            return (
                f"Shape 2 (ray): Ray across {self.nodes} nodes, the simulator standing in for "
                "the vLLM server on the first node, behind one router there"
            )
        return (
            f"Shape 2 (ray): one {self.node_plan.engine} server across {self.nodes} nodes, "
            f"tensor parallel {self.gpus_per_node} per node x pipeline parallel {self.nodes}, "
            "Ray executor, behind one router on the first node"
        )


def plan_nodes(
    inventory: Inventory,
    model: ModelSize | None,
    options: PlanOptions,
    nodes: int,
    shape: Literal["auto", "replicas", "ray"] = "auto",
) -> NodesPlan:
    """Lay the model out over ``nodes`` nodes that each have ``inventory``'s GPUs."""
    if nodes < 1:
        raise PlanError(f"--nodes {nodes} must be at least 1")
    for arg in options.extra_args:
        if arg.split("=", 1)[0] in RAY_OWNED_FLAGS:
            raise PlanError(
                f"extra engine argument {arg} is set by the SLURM layout; use --nodes "
                "(pipeline stages) and let the planner choose the executor"
            )
    gpus = len(inventory.gpus)
    if shape != "ray":
        try:
            one_node = plan(inventory, model, options)
        except PlanError:
            if shape == "replicas" or model is None:
                raise
        else:
            return NodesPlan("replicas", nodes, gpus, one_node, one_node.notes)
    return _plan_ray(inventory, model, options, nodes)


def _stage(model: ModelSize, stages: int) -> ModelSize:
    """One pipeline stage of ``model``: 1/stages of its layers, so of weights and KV cache."""
    return dataclasses.replace(
        model,
        name=f"{model.name} (1/{stages} pipeline stage)",
        weight_bytes=math.ceil(model.weight_bytes / stages),
        kv_bytes_per_token=math.ceil(model.kv_bytes_per_token / stages),
    )


def _plan_ray(
    inventory: Inventory, model: ModelSize | None, options: PlanOptions, nodes: int
) -> NodesPlan:
    gpus = len(inventory.gpus)
    if nodes < 2 and options.engine != "sim" and model is None:
        raise PlanError("the ray shape spans nodes: use --nodes 2 or more")
    ray_flags = ("--pipeline-parallel-size", str(nodes), "--distributed-executor-backend", "ray")
    notes: list[str] = []
    if options.engine == "sim":
        # The simulator has no parallelism to configure: it stands in for the server the head
        # node would run, so the Ray bring-up can be exercised without GPUs.
        stage_options = dataclasses.replace(options, replicas=1)
        notes.append("sim engine: the simulator stands in for the multi-node vLLM server")
        stage_plan = plan(inventory, model, stage_options)
        return NodesPlan("ray", nodes, gpus, stage_plan, tuple(notes))
    if gpus == 0:
        raise PlanError(
            "the ray shape needs GPUs on every node: declare them with --gpus (e.g. 8x80GB) "
            "or --gpus-per-node"
        )
    stage_options = dataclasses.replace(
        options,
        tensor_parallel_size=gpus,
        replicas=1,
        extra_args=(*options.extra_args, *ray_flags),
    )
    if model is not None:
        needed = _stages_needed(inventory, model, stage_options)
        if needed == 0 or needed > max(nodes, 1) or nodes < 2:
            more = f"--nodes {needed}" if needed else f"more than {MAX_HINT_NODES} nodes"
            raise PlanError(
                f"{model.name} does not fit on {nodes} node(s) of {gpus} GPUs as pipeline "
                f"stages; it needs {more} (or bigger GPUs, or a quantized checkpoint)"
            )
        model = _stage(model, nodes)
        notes.append(
            f"does not fit on one node; {needed} pipeline stage(s) would, {nodes} are used"
        )
    stage_plan = plan(inventory, model, stage_options)
    return NodesPlan("ray", nodes, gpus, stage_plan, (*notes, *stage_plan.notes))


def _stages_needed(inventory: Inventory, model: ModelSize, options: PlanOptions) -> int:
    """Fewest pipeline stages (nodes) whose stage fits one node at TP = its GPUs; 0: none."""
    for stages in range(2, MAX_HINT_NODES + 1):
        try:
            plan(inventory, _stage(model, stages), options)
        except PlanError:
            continue
        return stages
    return 0
