"""The calibration fit: it recovers a law from points made by that law."""

from __future__ import annotations

import pytest

from vllm_fleet.launcher.sim.calibrate import (
    DECODE_TOKENS,
    DecodePoint,
    Fit,
    PrefillPoint,
    PrefixPoint,
    fit,
    sim_constants,
)
from vllm_fleet.launcher.sim.config import SimConfig
from vllm_fleet.launcher.sim.engine import StepTiming, prefill_attention_pairs


def test_fit_recovers_the_law_it_was_given_and_scales_it_to_step_ms() -> None:
    truth = Fit(t0=0.003, t_seq=4e-5, t_tok=1.4e-5, t_kv=2.2e-7, t_pair=3e-8)
    prefill = [
        PrefillPoint(n, truth.step(1, n, 0, prefill_attention_pairs(0, n)))
        for n in (16, 256, 1024, 1900)
    ]
    prefix = [
        PrefixPoint(n, hit, 0.0, truth.step(1, n - hit, 0, prefill_attention_pairs(hit, n - hit)))
        for n, hit in ((1024, 896), (1900, 1792))
    ]
    decode = [
        DecodePoint(b, c, truth.step(b, b, b * (c + DECODE_TOKENS / 2)))
        for b, c in ((1, 16), (8, 16), (32, 16), (8, 1000), (32, 1900))
    ]
    result = fit(prefill, decode, prefix)
    for name in ("t0", "t_seq", "t_tok", "t_kv", "t_pair"):
        assert getattr(result, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    constants = sim_constants(result, step_ms=20.0)
    assert constants["batch_slowdown"] == pytest.approx(4e-5 / 0.003)
    assert constants["prefill_ms_per_token"] == pytest.approx(20.0 * 1.4e-5 / 0.003)
    assert constants["attention_ms_per_ktoken"] == pytest.approx(20.0 * 2.2e-4 / 0.003)
    assert constants["prefill_attention_ms_per_mpair"] == pytest.approx(20.0 * 3e-2 / 0.003)


def test_the_default_law_is_the_measured_shape_scaled_by_step_ms() -> None:
    """Doubling --step-ms doubles every step, whatever it holds (the shape is kept)."""
    base = StepTiming.from_config(SimConfig(step_ms=10.0))
    double = StepTiming.from_config(SimConfig(step_ms=20.0))
    for requests, tokens, kv_read, pairs in ((1, 1, 16, 0), (32, 32, 64_000, 0), (1, 2000, 0, 2e6)):
        assert double.step_duration(
            requests, tokens, kv_read, 1.0, prefill_pairs=int(pairs)
        ) == pytest.approx(
            2 * base.step_duration(requests, tokens, kv_read, 1.0, prefill_pairs=int(pairs))
        )
