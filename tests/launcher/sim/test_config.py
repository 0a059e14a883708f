"""Config validation and runtime knob changes."""

from __future__ import annotations

import pytest

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.sim.config import SimConfig, SimKnobs, apply_knobs


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_num_seqs", 0), ("speed", 0.0), ("fail_rate", 1.5), ("step_ms", 0.0), ("model", "")],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        SimConfig(**{field: value})  # type: ignore[arg-type]


def test_knobs_start_from_the_config() -> None:
    knobs = SimKnobs.from_config(SimConfig(speed=0.5, fail_rate=0.1))
    assert knobs.as_dict() == {"speed": 0.5, "fail_rate": 0.1, "hang": False, "healthy": True}


def test_apply_knobs_changes_everything_or_nothing() -> None:
    knobs = SimKnobs()
    apply_knobs(knobs, {"speed": 2, "healthy": False})
    assert (knobs.speed, knobs.healthy) == (2.0, False)
    for bad in ({"speed": 0}, {"fail_rate": 2}, {"hang": 1}, {"speed": True}, {"colour": 1}):
        with pytest.raises(ValueError):
            apply_knobs(knobs, {"fail_rate": 0.5, **bad})
        assert knobs.fail_rate == 0.0
