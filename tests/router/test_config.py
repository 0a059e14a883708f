"""RouterConfig from flags and FLEET_* variables: precedence, parsing, one-line errors."""

from __future__ import annotations

import argparse

import pytest

from vllm_fleet.launcher.cli import main
from vllm_fleet.router.config import OPTIONS, RouterConfig, add_arguments, config_from_args
from vllm_fleet.router.errors import ConfigError

B1 = "http://127.0.0.1:8001"
B2 = "http://127.0.0.1:8002"


def build(argv: list[str], env: dict[str, str] | None = None) -> RouterConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv), env or {})


def test_defaults_need_only_a_backend() -> None:
    config = build(["--backend", B1])
    assert config.backends == (B1,)
    assert config == RouterConfig(backends=(B1,))
    assert (config.port, config.policy, config.max_attempts) == (8000, "cost", 3)


def test_repeatable_flags_accumulate() -> None:
    config = build(["--backend", B1, "--backend", B2, "--api-key", "k1", "--api-key", "k2"])
    assert config.backends == (B1, B2)
    assert config.api_keys == ("k1", "k2")


def test_environment_variables_fill_in_and_flags_win() -> None:
    env = {
        "FLEET_BACKENDS": f"{B1}, {B2}",
        "FLEET_PORT": "9000",
        "FLEET_API_KEYS": "a,b",
        "FLEET_UPSTREAM_API_KEY": "up",
        "FLEET_POLICY": "round-robin",
        "FLEET_MAX_BODY_BYTES": "1024",
        "FLEET_MAX_ATTEMPTS": "5",
        "FLEET_FIRST_BYTE_TIMEOUT": "2.5",
        "FLEET_SHUTDOWN_GRACE": "7",
        "FLEET_LOG_FORMAT": "json",
    }
    config = build([], env)
    assert config.backends == (B1, B2)
    assert config.port == 9000
    assert config.api_keys == ("a", "b")
    assert config.upstream_api_key == "up"
    assert config.policy == "round-robin"
    assert (config.max_body_bytes, config.max_attempts) == (1024, 5)
    assert (config.first_byte_timeout_s, config.shutdown_grace_s) == (2.5, 7.0)
    assert config.log_format == "json"
    overridden = build(["--port", "9100", "--backend", B2], env)
    assert overridden.port == 9100
    assert overridden.backends == (B2,)


def test_dns_and_file_sources() -> None:
    config = build(["--discover-dns", "vllm.default.svc:8000", "--backends-file", "/tmp/b.yaml"])
    assert config.discover_dns == ("vllm.default.svc", 8000)
    assert config.backends_file == "/tmp/b.yaml"


def test_every_option_has_a_distinct_flag_and_variable() -> None:
    fields = {f for f in RouterConfig.__dataclass_fields__}
    assert {o.field for o in OPTIONS} == fields
    assert len({o.flag for o in OPTIONS}) == len(OPTIONS)
    assert all(o.env.startswith("FLEET_") for o in OPTIONS)


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--backend", B1, "--port", "http"], {}, "--port"),
        (["--backend", B1], {"FLEET_PORT": "70000"}, "FLEET_PORT"),
        (["--backend", B1, "--max-attempts", "0"], {}, "--max-attempts"),
        (["--backend", B1], {"FLEET_MAX_BODY_BYTES": "lots"}, "FLEET_MAX_BODY_BYTES"),
        (["--backend", B1, "--first-byte-timeout", "-1"], {}, "--first-byte-timeout"),
        (["--backend", B1, "--policy", "fastest"], {}, "--policy"),
        (["--backend", B1, "--log-format", "xml"], {}, "--log-format"),
        (["--backend", "ftp://x:1"], {}, "--backend"),
        ([], {"FLEET_BACKENDS": "http://h:1/v1"}, "FLEET_BACKENDS"),
        (["--discover-dns", "no-port"], {}, "--discover-dns"),
        (["--backend", B1, "--api-key", ""], {}, "--api-key"),
    ],
)
def test_bad_values_name_their_flag_or_variable(
    argv: list[str], env: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build(argv, env)
    message = str(info.value)
    assert message.startswith(named + ":"), message
    assert "\n" not in message


def test_policy_error_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"least-busy.*round-robin"):
        build(["--backend", B1, "--policy", "fastest"])


def test_no_backend_source_is_an_error_naming_all_ways() -> None:
    with pytest.raises(ConfigError, match=r"--backend.*--backends-file.*--discover-dns"):
        build([])


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="--max-attempts / FLEET_MAX_ATTEMPTS"):
        RouterConfig(backends=(B1,), max_attempts=0)


def test_keys_stay_out_of_the_repr() -> None:
    config = build(["--backend", B1, "--api-key", "sk-secret", "--upstream-api-key", "up-secret"])
    assert "secret" not in repr(config)


def test_cli_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["router", "--backend", B1, "--max-attempts", "zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "vllm-fleet router: error: --max-attempts: 'zero' is not an integer"
