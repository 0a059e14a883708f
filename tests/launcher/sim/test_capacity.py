"""Saturation throughput of a simulated replica, measured on its own engine."""

from __future__ import annotations

import pytest

from vllm_fleet.launcher.sim.capacity import saturation_rps
from vllm_fleet.launcher.sim.config import SimConfig


def test_long_prompts_halve_what_short_ones_allow_and_speed_scales_it() -> None:
    config = SimConfig(step_ms=20.0, batch_slowdown=0.05, max_num_seqs=16)
    short = [(list(range(i * 1000, i * 1000 + 50)), 64) for i in range(64)]
    long = [(list(range(i * 1000, i * 1000 + 900)), 64) for i in range(64)]
    short_rps = saturation_rps(config, short)
    assert saturation_rps(config, long) < 0.7 * short_rps  # the batch's context slows steps
    assert saturation_rps(config, short, speed=0.5) == pytest.approx(short_rps / 2)
    no_context = SimConfig(
        step_ms=20.0, batch_slowdown=0.05, max_num_seqs=16, prefill_ms_per_token=0.0,
        attention_ms_per_ktoken=0.0, prefill_attention_ms_per_mpair=0.0,
    )  # fmt: skip
    # the old law: batches of 16 requests, 64 steps each (the prefill step samples token 1)
    assert saturation_rps(no_context, short) == pytest.approx(16 / (64 * 0.036))


def test_no_requests_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        saturation_rps(SimConfig(), [])
