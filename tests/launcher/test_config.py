from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vllm_fleet.launcher.config import (
    FleetConfig,
    RestartConfig,
    config_to_mapping,
    from_mapping,
    load_config,
    parse_flag,
)
from vllm_fleet.launcher.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "fleet.example.yaml"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"router": {"prot": 8000}}, "fleet.yaml: router.prot: unknown key (did you mean 'port'?)"),
        ({"modle": "m"}, "fleet.yaml: modle: unknown key (did you mean 'model'?)"),
        ({"restart": {"max_restart": 1}}, "restart.max_restart: unknown key (did you mean"),
        ({"replicas": "two"}, "fleet.yaml: replicas: expected an integer, got 'two'"),
        ({"replicas": True}, "replicas: expected an integer, got True"),
        ({"replicas": 0}, "replicas: must be >= 1, got 0"),
        ({"engine": "tgi"}, "engine: expected one of 'vllm', 'sim', got 'tgi'"),
        ({"runtime": "podman"}, "runtime: expected one of 'process', 'docker', got 'podman'"),
        ({"image": "my image"}, "image: must be a Docker image reference"),
        ({"image": ""}, "image: must be a Docker image reference"),
        ({"router": {"port": 70000}}, "router.port: must be a TCP port"),
        ({"router": {"port": "80"}}, "router.port: expected an integer, got '80'"),
        ({"router": {"policy": "fastest"}}, "router.policy: unknown policy; use one of"),
        ({"router": 8000}, "router: expected a mapping, got 8000"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization: must be in (0, 1]"),
        ({"extra_args": "--foo"}, "extra_args: expected a list of strings, got '--foo'"),
        ({"env": {"A": ["x"]}}, "env: expected a mapping of strings to strings"),
        ({"gpus": 8}, "gpus: expected a string or a list of strings, got 8"),
        ({"restart": {"backoff_initial_s": "1s"}}, "restart.backoff_initial_s: expected a number"),
        ({"health_timeout_s": 0}, "health_timeout_s: must be >= 0.1"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_mapping(data)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    with pytest.raises(ConfigError, match=r"zzz: unknown key; known keys: model, "):
        from_mapping({"zzz": 1})


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_mapping(["model"])


def test_values_are_converted_and_defaults_kept() -> None:
    config = from_mapping(
        {
            "model": "m",
            "env": {"OMP_NUM_THREADS": 2},
            "extra_args": ["--enforce-eager"],
            "gpus": ["80GB", "80GB"],
            "health_timeout_s": 5,
            "router": {"port": 9000, "api_keys": ["k1"]},
            "restart": {"max_restarts": 2},
        }
    )
    assert config.env == {"OMP_NUM_THREADS": "2"}
    assert config.extra_args == ("--enforce-eager",)
    assert config.gpus == ("80GB", "80GB")
    assert config.health_timeout_s == 5.0
    assert isinstance(config.health_timeout_s, float)
    assert config.router.port == 9000
    assert config.router.api_keys == ("k1",)
    assert config.router.host == "127.0.0.1"
    assert config.restart == RestartConfig(max_restarts=2)
    assert config.router_url == "http://127.0.0.1:9000"


def test_runtime_docker_and_its_image_are_accepted() -> None:
    assert FleetConfig().runtime == "process"
    assert FleetConfig().image is None
    config = from_mapping({"runtime": "docker", "image": "vllm-fleet-engine-cpu:0.1.0"})
    assert config.runtime == "docker"
    assert config.image == "vllm-fleet-engine-cpu:0.1.0"
    assert from_mapping(config_to_mapping(config)) == config


def test_flags_override_the_file_and_none_keeps_it() -> None:
    config = from_mapping({"model": "m", "replicas": 2, "router": {"port": 9000, "policy": None}})
    merged = config.with_overrides(
        {"replicas": 3, "model": None, "router.port": 9100, "engine": "sim"}
    )
    assert merged.replicas == 3
    assert merged.model == "m"
    assert merged.router.port == 9100
    assert merged.engine == "sim"


def test_overrides_are_validated_too() -> None:
    with pytest.raises(ConfigError, match="command line: engine: expected one of"):
        FleetConfig().with_overrides({"engine": "tgi"})


@pytest.mark.parametrize(
    ("key", "raw", "flag", "expected"),
    [
        ("replicas", "3", "--replicas", 3),
        ("gpu_memory_utilization", "0.8", "--gpu-memory-utilization", 0.8),
        ("router.port", "9000", "--port", 9000),
        ("router.api_keys", ["a", "b"], "--api-key", ("a", "b")),
        ("extra_args", ["--enforce-eager"], "--engine-arg", ("--enforce-eager",)),
        ("gpus", "8x80GB", "--gpus", "8x80GB"),
        ("health_timeout_s", "30", "--health-timeout", 30.0),
        ("runtime", "docker", "--runtime", "docker"),
        ("image", "vllm/vllm-openai:v0.32.0", "--image", "vllm/vllm-openai:v0.32.0"),
    ],
)
def test_flags_are_typed_like_the_file(key: str, raw: Any, flag: str, expected: Any) -> None:
    assert parse_flag(key, raw, flag) == expected


@pytest.mark.parametrize(
    ("key", "raw", "flag", "message"),
    [
        ("replicas", "two", "--replicas", "--replicas: expected an integer, got 'two'"),
        ("replicas", "0", "--replicas", "--replicas: must be >= 1, got '0'"),
        ("engine", "tgi", "--engine", "--engine: expected one of 'vllm', 'sim', got 'tgi'"),
        ("router.port", "99999", "--port", "--port: must be a TCP port"),
        ("runtime", "k8s", "--runtime", "--runtime: expected one of 'process', 'docker', got"),
    ],
)
def test_bad_flags_name_the_flag(key: str, raw: str, flag: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_flag(key, raw, flag)
    assert str(info.value).startswith(message)


def test_round_trip_through_plain_data() -> None:
    config = from_mapping({"model": "m", "extra_args": ["-x"], "router": {"api_keys": ["k"]}})
    assert from_mapping(config_to_mapping(config)) == config


def test_load_config_reports_yaml_syntax_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"fleet.yaml: .* at line \d+; fix the YAML syntax"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == FleetConfig()


def test_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "prod.yaml"
    path.write_text("router:\n  prot: 8000\n")
    with pytest.raises(ConfigError, match=r"prod.yaml: router.prot: unknown key"):
        load_config(path)


def test_example_file_is_valid() -> None:
    config = load_config(EXAMPLE)
    assert config.model
    assert config.router.port == 8000


def test_to_plan_options_carries_the_engine_settings() -> None:
    config = from_mapping(
        {
            "model": "m",
            "engine": "sim",
            "replicas": 2,
            "base_port": 9001,
            "max_num_seqs": 8,
            "extra_args": ["--step-ms", "1"],
            "env": {"A": "b"},
        }
    )
    options = config.to_plan_options()
    assert options.model == "m"
    assert options.engine == "sim"
    assert options.replicas == 2
    assert options.base_port == 9001
    assert options.max_num_seqs == 8
    assert options.extra_args == ("--step-ms", "1")
    assert dict(options.env) == {"A": "b"}
