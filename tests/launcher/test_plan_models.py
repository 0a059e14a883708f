"""Several models on one inventory (vllm_fleet.launcher.plan_models), with the sizes of
tests/launcher/test_planner.py (its docstring has the per-GPU arithmetic):

  Llama-3.1-70B  TP4 on 80 GB at the full context (TP2 needs 87.7 GiB > 72 usable)
  Llama-3.1-8B   TP1 on 80 GB (33.0 GiB); on 24 GB TP1 only with a short context:
                 14.96 + 2 + KV for 32768 tokens (4.0 GiB) = 20.96 <= 21.6 usable
  Mistral-Nemo   on 24 GB at max_model_len 32768: TP1 = 22.8 + 2 > 21.6; TP2 = 11.4 + 2 + 2.5
                 = 15.9 <= 21.6 -> TP2
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.launcher.test_planner import EIGHT_80, gpus, inventory, model
from vllm_fleet.launcher.cli import main
from vllm_fleet.launcher.config import from_mapping
from vllm_fleet.launcher.errors import ConfigError, PlanError
from vllm_fleet.launcher.fleet_models import resolve_models
from vllm_fleet.launcher.plan_models import plan_models
from vllm_fleet.launcher.plan_types import FleetPlan, Inventory, ModelRequest, PlanOptions

MODELS = Path(__file__).parent / "models"
FOUR_24 = inventory(gpus(4, 24))
NUMA_8x80 = inventory(gpus(4, 80, numa_node=0), gpus(4, 80, start=4, numa_node=1))


def request(
    name: str,
    served: str,
    replicas: int | str | None = None,
    gpu_ids: tuple[int, ...] = (),
    **options: Any,
) -> ModelRequest:
    opts = PlanOptions(model=str(MODELS / name), served_model_name=served, **options)
    return ModelRequest(opts, replicas=replicas, gpu_ids=gpu_ids)


def place(inv: Inventory, *requests: ModelRequest) -> FleetPlan:
    sizes = {r.name: model(r.options.model.rsplit("/", 1)[-1]) for r in requests}
    return plan_models(inv, sizes, requests)


def layout(fleet: FleetPlan) -> dict[str, list[tuple[int, ...]]]:
    return {m.name: [r.gpus for r in m.plan.replicas] for m in fleet.models}


def test_8x80_a_70b_replica_and_an_8b_filling_the_rest() -> None:
    fleet = place(
        EIGHT_80,
        request("Llama-3.1-8B", "small", "auto"),
        request("Llama-3.1-70B", "big", 1),
    )
    # the counted 70B first (TP4 on 0-3), then the auto 8B takes every GPU left, TP1 each.
    assert layout(fleet) == {"small": [(4,), (5,), (6,), (7,)], "big": [(0, 1, 2, 3)]}
    assert fleet.leftover_gpus == ()
    names = [r.name for r in fleet.replicas]
    assert names == ["small-0", "small-1", "small-2", "small-3", "big-0"]
    ports = sorted(r.port for r in fleet.replicas)
    assert ports == list(range(8001, 8006))  # one port each, no collision across models
    big = fleet.replicas[-1]
    assert big.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert big.command[big.command.index("--served-model-name") + 1] == "big"
    assert {r.served_model for r in fleet.replicas} == {"small", "big"}


def test_8x80_pinned_gpus_and_two_auto_models_share_the_rest_evenly() -> None:
    fleet = place(
        EIGHT_80,
        request("Llama-3.1-8B", "a", "auto"),
        request("Mixtral-8x7B-v0.1", "moe", None, gpu_ids=(6, 7)),
        request("Mistral-Nemo-Base-2407", "b", "auto"),
    )
    # Mixtral pinned to 6,7 is TP2 (47.5 GiB <= 72); a and b take turns on 0-5: 3 each.
    assert layout(fleet) == {
        "a": [(0,), (2,), (4,)],
        "moe": [(6, 7)],
        "b": [(1,), (3,), (5,)],
    }


def test_8x80_over_subscribed_names_each_models_numbers() -> None:
    with pytest.raises(PlanError) as err:
        place(
            EIGHT_80,
            request("Llama-3.1-70B", "big", 2),
            request("Llama-3.1-8B", "small", 1),
        )
    message = str(err.value)
    assert "models need 9 GPUs, the inventory has 8" in message
    assert "big 2x TP4 = 8 GPUs" in message and "small 1x TP1 = 1 GPUs" in message
    assert "\n" not in message


def test_wide_tp_groups_stay_in_one_numa_node_when_placed_with_narrow_ones() -> None:
    fleet = place(
        NUMA_8x80,
        request("Llama-3.1-8B", "small", 2, tensor_parallel_size=2),
        request("Llama-3.1-70B", "big", 1),
    )
    # big (TP4) is placed before small (TP2) although listed second: it gets NUMA node 0 whole.
    assert layout(fleet) == {"small": [(4, 5), (6, 7)], "big": [(0, 1, 2, 3)]}
    numa = {g.index: g.numa_node for g in NUMA_8x80.gpus}
    for replica in fleet.replicas:
        assert len({numa[i] for i in replica.gpus}) == 1


def test_4x24_nemo_tp2_and_8b_tp1_fill_the_box() -> None:
    fleet = place(
        FOUR_24,
        request("Mistral-Nemo-Base-2407", "nemo", 1, max_model_len=32768),
        request("Llama-3.1-8B", "small", "auto", max_model_len=8192),
    )
    assert layout(fleet) == {"nemo": [(0, 1)], "small": [(2,), (3,)]}
    by_model = {m.name: m.plan for m in fleet.models}
    assert by_model["nemo"].max_model_len == 32768 and by_model["small"].max_model_len == 8192


def test_4x24_over_subscribed() -> None:
    with pytest.raises(PlanError, match=r"models need 5 GPUs, the inventory has 4: nemo 2x TP2"):
        place(
            FOUR_24,
            request("Mistral-Nemo-Base-2407", "nemo", 2, max_model_len=32768),
            request("Llama-3.1-8B", "small", 1, max_model_len=8192),
        )


def test_4x24_auto_model_with_nothing_left_is_refused() -> None:
    # an auto model needs room for at least one replica: counted in the over-subscription.
    with pytest.raises(PlanError, match=r"small 1x TP1 = 1 GPUs \(auto: at least one\)"):
        place(
            FOUR_24,
            request("Mistral-Nemo-Base-2407", "nemo", 2, max_model_len=32768),
            request("Llama-3.1-8B", "small", "auto", max_model_len=8192),
        )


def test_a_model_that_fits_nowhere_is_named() -> None:
    with pytest.raises(PlanError, match=r"^model huge: .*Llama-3.1-405B"):
        place(FOUR_24, request("Llama-3.1-405B", "huge", 1), request("Llama-3.1-8B", "s", 1))


def test_sim_and_cpu_models_take_no_gpu_and_their_own_ports() -> None:
    sim = ModelRequest(PlanOptions(model="echo", engine="sim"), replicas=2)
    fleet = plan_models(
        inventory(), {"echo": None, "small": None}, [request("Llama-3.1-8B", "small"), sim]
    )
    assert [(r.name, r.port, r.gpus) for r in fleet.replicas] == [
        ("small-0", 8001, ()),
        ("echo-0", 8002, ()),
        ("echo-1", 8003, ()),
    ]
    assert "vllm_fleet.launcher.cli" in fleet.replicas[1].command


# --------------------------------------------------------------------------- fleet.yaml


def _config(models: list[dict[str, object]], **top: object) -> list[ModelRequest]:
    return list(resolve_models(from_mapping({"models": models, **top}), "f.yaml"))


def test_models_inherit_the_shared_values_and_keep_their_own() -> None:
    reqs = _config(
        [
            {"model": "a/b", "served_model_name": "chat", "replicas": 2},
            {"model": "c", "gpus": [0, 1], "max_model_len": 4096, "env": {"X": "2"},
             "lora_modules": {"sql": "/ad/sql"}, "max_lora_rank": 16},
        ],
        max_model_len=8192, env={"X": "1", "Y": "1"}, dtype="bf16",
    )  # fmt: skip
    assert reqs[0].name == "chat" and reqs[0].replicas == 2
    assert reqs[0].options.max_model_len == 8192 and reqs[0].options.dtype == "bfloat16"
    assert reqs[1].gpu_ids == (0, 1) and reqs[1].options.max_model_len == 4096
    assert reqs[1].options.env == {"X": "2", "Y": "1"}
    assert reqs[1].options.lora_modules == (("sql", "/ad/sql"),)
    assert reqs[1].options.max_lora_rank == 16


@pytest.mark.parametrize(
    ("models", "top", "message"),
    [
        ([{"model": "a"}], {"model": "b"}, r"f.yaml: model: set per model when models: is given"),
        ([{"served_model_name": "x"}], {}, r"models\[0\].model: required"),
        ([{"model": "a", "replicas": 2, "gpus": 2}], {}, r"models\[0\]: replicas and gpus"),
        ([{"model": "a"}, {"model": "b", "served_model_name": "a"}], {},
         r"models\[1\]: the name 'a' is already served by models\[0\]"),
        ([{"model": "a", "lora_modules": {"bad name": "/p"}}], {},
         r"models\[0\].lora_modules: adapter name 'bad name'"),
        ([{"model": "a", "gpus": [0, 1, 2], "tensor_parallel_size": 2}], {},
         r"models\[0\].gpus: 3 GPUs do not split into TP2"),
    ],
)  # fmt: skip
def test_cross_field_mistakes_are_one_line(
    models: list[dict[str, object]], top: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _config(models, **top)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([{"model": "a", "gpus": "two"}], r"models\[0\].gpus: expected an integer or a list"),
        ([{"model": "a", "replicas": "many"}], r"models\[0\].replicas: expected an integer or"),
        ([{"model": "a", "replicas": 0}], r"models\[0\].replicas: must be >= 1 or auto"),
        ([{"model": "a", "gpus": [1, 1]}], r"models\[0\].gpus: must list distinct GPU ids"),
        ([{"model": "a", "replica": 2}], r"models\[0\].replica: unknown key \(did you mean"),
        ("a", r"models: expected a list of mappings"),
    ],
)
def test_entry_mistakes_name_the_entry(models: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_mapping({"models": models})


# --------------------------------------------------------------------------- the command


def test_plan_config_prints_the_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "gpus: 8x80GB\nmodels:\n"
        f"  - {{model: {MODELS / 'Llama-3.1-70B'}, served_model_name: big, replicas: 1}}\n"
        f"  - {{model: {MODELS / 'Llama-3.1-8B'}, served_model_name: small, replicas: auto,"
        " lora_modules: {sql: /adapters/sql}}\n"
        "  - {model: echo, engine: sim, replicas: 2}\n"
    )
    assert main(["plan", "--config", str(fleet)]) == 0
    out = capsys.readouterr().out
    assert "Plan: 7 replicas of 3 models" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ")}
    assert rows["big"][1:6] == ["vllm", "1", "1", "4", "0,1,2,3"]
    assert rows["small"][1:5] == ["vllm", "auto", "4", "1"] and rows["small"][-1] == "sql"
    assert rows["echo"][1:4] == ["sim", "2", "2"]
    assert "--enable-lora --lora-modules sql=/adapters/sql" in out
    assert main(["plan", "--config", str(fleet), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in data["models"]] == ["big", "small", "echo"]
    assert data["models"][1]["gpus"] == [[4], [5], [6], [7]]
    assert len(data["replicas"]) == 7 and data["leftover_gpus"] == []


def test_plan_config_over_subscribed_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "gpus: 8x80GB\nmodels:\n"
        f"  - {{model: {MODELS / 'Llama-3.1-70B'}, served_model_name: big, replicas: 2}}\n"
        f"  - {{model: {MODELS / 'Llama-3.1-8B'}, served_model_name: small, replicas: 1}}\n"
    )
    assert main(["plan", "--config", str(fleet)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vllm-fleet plan: error: models need 9 GPUs")
    assert len(err.splitlines()) == 1


def test_the_example_files_models_block_is_valid_and_plans() -> None:
    example = (MODELS.parents[2] / "docs" / "fleet.example.yaml").read_text()
    block = example.split("\n# models:\n", 1)[1].split("\n#\n", 1)[0]
    text = "models:\n" + "\n".join(line.removeprefix("# ") for line in block.splitlines())
    reqs = resolve_models(from_mapping(yaml.safe_load(text)), "fleet.example.yaml")
    assert [r.name for r in reqs] == ["chat", "fast", "mistralai/Mistral-Nemo-Instruct-2407"]
    assert reqs[1].replicas == "auto" and len(reqs[1].options.lora_modules) == 2
    assert reqs[2].gpu_ids == (7,)
