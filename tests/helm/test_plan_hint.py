"""The multi-node command `vllm-fleet plan` prints for a model too big for one node, pasted as
a user would: split like a shell, every ``--set`` parsed by Helm's own strvals parser, then
validated against the schema and rendered by the real Helm engine.

The hint once said ``set engine.multiNode=true``, which the schema rejects (the key is
``engine.multiNode.enabled``); the tests then only looked for a substring of it.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest

from tests.helm.render import CHART_DIR, ROOT, load_chart, render
from vllm_fleet.launcher.cli import main
from vllm_fleet.launcher.vllm_args import SERVER_MODULE

LLAMA_405B = "meta-llama/Llama-3.1-405B"


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with load_chart() as loaded:
        yield loaded


def _hinted_command(capsys: pytest.CaptureFixture[str], *flags: str) -> list[str]:
    status = main(["plan", "--model", LLAMA_405B, "--params", "405B", *flags])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "helm install" in err, err
    return shlex.split(err[err.index("helm install") :])


def _merge(into: dict[str, Any], values: dict[str, Any]) -> None:
    """Helm applies each --set to one map, in order."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _set_values(argv: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for flag, value in zip(argv[4::2], argv[5::2], strict=True):
        assert flag == "--set"
        _merge(values, helm.parse_set_string(value))
    return values


@pytest.mark.parametrize(
    ("flags", "nodes", "extra_args"),
    [
        # 755 GiB of weights: TP8 x 2 stages = 47 GiB per 80 GB GPU, with the full context's KV.
        (["--gpus", "8x80GB"], 2, {}),
        # 40 GB GPUs need 3 stages; the fixed context and a served name with a space come along.
        (
            ["--gpus", "8x40GB", "--max-model-len", "8192", "--served-model-name", "big one"],
            3,
            {"--max-model-len": "8192", "--served-model-name": "big one"},
        ),
    ],
)
def test_the_hinted_command_renders_a_multi_node_fleet(
    chart: helm.Chart,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    nodes: int,
    extra_args: dict[str, str],
) -> None:
    argv = _hinted_command(capsys, *flags)

    assert argv[:3] == ["helm", "install", "fleet"]
    assert (ROOT / argv[3]).resolve() == CHART_DIR
    out = render(chart, _set_values(argv))  # schema first, as `helm install` does

    template = out.one("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    assert template["size"] == nodes
    (leader,) = template["leaderTemplate"]["spec"]["containers"]
    assert f"exec python3 -m {SERVER_MODULE}" in leader["command"][2]
    args = leader["args"]
    expected = {
        "--model": LLAMA_405B,
        "--tensor-parallel-size": "8",
        "--pipeline-parallel-size": str(nodes),
        **extra_args,
    }
    assert {flag: args[args.index(flag) + 1] for flag in expected} == expected
    assert leader["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_the_old_hint_is_what_the_schema_rejects(chart: helm.Chart) -> None:
    """What the planner used to suggest: the check above would have failed on it."""
    values = helm.parse_set_string(f"model.name={LLAMA_405B},engine.multiNode=true")

    with pytest.raises(helm.HelmError, match="multiNode"):
        render(chart, values)
