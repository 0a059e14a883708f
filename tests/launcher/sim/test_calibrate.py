"""The calibration fit: it recovers a law from points made by that law."""

from __future__ import annotations

import pytest

from launcher.sim.calibrate import DECODE_TOKENS, DecodePoint, Fit, PrefillPoint, fit, sim_constants
from launcher.sim.config import SimConfig
from launcher.sim.engine import StepTiming


def test_fit_recovers_the_law_it_was_given_and_scales_it_to_step_ms() -> None:
    truth = Fit(t0=0.003, t_seq=4e-5, t_tok=7e-6, t_kv=2.7e-7)
    prefill = [PrefillPoint(n, truth.step(1, n, n)) for n in (16, 256, 1024, 1900)]
    decode = [
        DecodePoint(b, c, truth.step(b, b, b * (c + DECODE_TOKENS / 2)))
        for b, c in ((1, 16), (8, 16), (32, 16), (8, 1000), (32, 1900))
    ]
    result = fit(prefill, decode)
    for name in ("t0", "t_seq", "t_tok", "t_kv"):
        assert getattr(result, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    constants = sim_constants(result, step_ms=20.0)
    assert constants["batch_slowdown"] == pytest.approx(4e-5 / 0.003)
    assert constants["prefill_ms_per_token"] == pytest.approx(20.0 * 7e-6 / 0.003)
    assert constants["attention_ms_per_ktoken"] == pytest.approx(20.0 * 2.7e-4 / 0.003)


def test_the_default_law_is_the_measured_shape_scaled_by_step_ms() -> None:
    """Doubling --step-ms doubles every step, whatever it holds (the shape is kept)."""
    base = StepTiming.from_config(SimConfig(step_ms=10.0))
    double = StepTiming.from_config(SimConfig(step_ms=20.0))
    for requests, tokens, kv_read in ((1, 1, 16), (32, 32, 64_000), (1, 2000, 2000)):
        assert double.step_duration(requests, tokens, kv_read, 1.0) == pytest.approx(
            2 * base.step_duration(requests, tokens, kv_read, 1.0)
        )
