"""values.schema.json and `required`: a typo, a wrong type or a missing model fails the install
with a message naming the value, instead of a release that renders and then misbehaves."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest

from tests.helm.render import load_chart, render, with_model


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with load_chart() as loaded:
        yield loaded


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # Typos: unknown keys are refused at every level, not silently ignored.
        ({"engine": {"replica": 4}}, "at '/engine': additional properties 'replica' not allowed"),
        ({"engien": {"replicas": 4}}, "additional properties 'engien' not allowed"),
        (
            {"router": {"config": {"maxAttempt": 2}}},
            "at '/router/config': additional properties 'maxAttempt' not allowed",
        ),
        (
            {"engine": {"multiNode": {"enable": True}}},
            "at '/engine/multiNode': additional properties 'enable' not allowed",
        ),
        # Wrong types and ranges.
        (
            {"engine": {"tensorParallelSize": "four"}},
            "at '/engine/tensorParallelSize': got string, want integer",
        ),
        ({"engine": {"tensorParallelSize": 0}}, "at '/engine/tensorParallelSize'"),
        ({"engine": {"replicas": -1}}, "at '/engine/replicas'"),
        ({"engine": {"gpuMemoryUtilization": 1.5}}, "at '/engine/gpuMemoryUtilization'"),
        ({"engine": {"port": 70000}}, "at '/engine/port'"),
        ({"engine": {"extraArgs": "--enforce-eager"}}, "at '/engine/extraArgs': got string"),
        ({"engine": {"modelCache": {"type": "nfs"}}}, "at '/engine/modelCache/type'"),
        ({"engine": {"multiNode": {"pipelineParallelSize": 1}}}, "pipelineParallelSize"),
        ({"router": {"replicas": "2"}}, "at '/router/replicas': got string, want integer"),
        ({"router": {"config": {"policy": "fastest"}}}, "'cost', 'least-busy', 'round-robin'"),
        ({"router": {"config": {"connectTimeoutSeconds": 0}}}, "connectTimeoutSeconds"),
        ({"router": {"service": {"type": "External"}}}, "at '/router/service/type'"),
        ({"apiKeys": {"keys": ["a,b"]}}, "at '/apiKeys/keys/0'"),
        ({"apiKeys": {"keys": [""]}}, "at '/apiKeys/keys/0'"),
        ({"adminApiKeys": {"keys": "k"}}, "at '/adminApiKeys/keys': got string, want array"),
        (
            {"adminApiKeys": {"key": ["k"]}},
            "at '/adminApiKeys': additional properties 'key' not allowed",
        ),
        ({"adminApiKeys": {"keys": ["a,b"]}}, "at '/adminApiKeys/keys/0'"),
        ({"adminApiKeys": {"secretKey": 3}}, "at '/adminApiKeys/secretKey': got number"),
        ({"adminApiKeys": {"existingSecret": "Admin_Keys"}}, "at '/adminApiKeys/existingSecret'"),
        ({"model": {"name": 3}}, "at '/model/name': got number, want string"),
        ({"serviceMonitor": {"interval": "often"}}, "at '/serviceMonitor/interval'"),
    ],
)
def test_schema_rejects_bad_values_naming_them(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(with_model(values))
    assert message in str(caught.value)
    # `helm install` runs the same check before rendering anything.
    with pytest.raises(helm.HelmValuesError, match="values don't meet the specifications"):
        chart.render(with_model(values), name="fleet", namespace="llm")


def test_missing_model_name_is_refused_with_the_fix(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError) as caught:
        render(chart, {})
    assert "model.name is required" in str(caught.value)
    assert "--set model.name=" in str(caught.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"engine": {"modelCache": {"type": "existingClaim"}}},
            "engine.modelCache.existingClaim is required",
        ),
        ({"httpRoute": {"enabled": True}}, "httpRoute.parentRefs: name at least one Gateway"),
    ],
)
def test_incomplete_choices_are_refused_with_the_fix(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, with_model(values))


def test_the_defaults_and_documented_setups_pass_the_schema(chart: helm.Chart) -> None:
    chart.validate_schema(with_model())
    chart.validate_schema(chart.values)  # the shipped values.yaml itself, model still unset
    chart.validate_schema(
        helm.parse_set_string(
            "model.name=m,engine.tensorParallelSize=8,engine.multiNode.enabled=true,"
            "engine.multiNode.pipelineParallelSize=2,engine.replicas=2"
        )
    )
