"""The heterogeneous simulated fleet (three replicas at full speed, one at half) and traffic
calibrated against its capacity: the setting of scenarios 1-4 and 6."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from bench.load import RequestMix
from bench.replicas import SimSettings
from bench.scenarios.harness import MODEL, Options
from vllm_fleet.launcher.sim.config import DEFAULT_CHAT_MAX_TOKENS
from vllm_fleet.launcher.sim.engine import StepTiming

FULL = SimSettings(model=MODEL)
HALF = replace(FULL, speed=0.5)
HETEROGENEOUS = [FULL, FULL, FULL, HALF]
#: Fraction of fleet capacity scenario 1 offers.
LOAD = 0.7


def replica_capacity_rps(settings: SimSettings, mean_tokens: float) -> float:
    """Requests per second one simulated replica finishes with its batch full.

    From the simulator's own step model: a full batch of `max_num_seqs` gets one token each per
    step, so tokens/s = max_num_seqs / step time, and requests/s = that / mean output tokens.
    """
    timing = StepTiming(settings.step_ms, settings.batch_slowdown, 0.0)
    step_s = timing.duration(settings.max_num_seqs, 0, settings.speed)
    return settings.max_num_seqs / step_s / mean_tokens


def fleet_capacity_rps(fleet: Sequence[SimSettings], mix: RequestMix) -> float:
    mean_tokens = mix.mean_tokens(DEFAULT_CHAT_MAX_TOKENS)
    return sum(replica_capacity_rps(s, mean_tokens) for s in fleet)


def base_mix(
    opts: Options,
    fraction: float = LOAD,
    duration: float | None = None,
    omit_max_tokens_fraction: float = 0.0,
) -> RequestMix:
    """Scenario 1's traffic at `fraction` of the heterogeneous fleet's capacity."""
    mix = RequestMix(
        rate=1.0,
        duration=duration or (8.0 if opts.quick else 20.0),
        seed=opts.seed,
        omit_max_tokens_fraction=omit_max_tokens_fraction,
    )
    return replace(mix, rate=fraction * fleet_capacity_rps(HETEROGENEOUS, mix))


HETERO_LABELS = ["r1", "r2", "r3", "r4 (½ speed)"]


def setting_text(mix: RequestMix, fleet: Sequence[SimSettings]) -> str:
    capacity = fleet_capacity_rps(fleet, mix)
    speeds = ", ".join(f"{s.speed:g}" for s in fleet)
    s0 = fleet[0]
    return (
        f"{len(fleet)} simulated replicas (speeds {speeds}; max {s0.max_num_seqs} running, "
        f"step {s0.step_ms:g} ms growing {100 * s0.batch_slowdown:g}% per running request). "
        f"Poisson arrivals at {mix.rate:.2f} req/s = {mix.rate / capacity:.0%} of the "
        f"calibrated fleet capacity ({capacity:.2f} req/s) for {mix.duration:g} s, seed "
        f"{mix.seed}; {1 - mix.long_fraction:.0%} of requests want {mix.short_tokens[0]}-"
        f"{mix.short_tokens[1]} tokens, {mix.long_fraction:.0%} {mix.long_tokens[0]}-"
        f"{mix.long_tokens[1]}; prompts {mix.prompt_words[0]}-{mix.prompt_words[1]} words; "
        f"{mix.stream_fraction:.0%} streamed"
        + (
            f"; {mix.omit_max_tokens_fraction:.0%} omit max_tokens"
            if mix.omit_max_tokens_fraction
            else ""
        )
        + "."
    )
