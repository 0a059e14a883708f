"""The heterogeneous simulated fleet (three replicas at full speed, one at half) and traffic
calibrated against its capacity: the setting of scenarios 1-4 and 6."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from functools import cache

from bench.load import RequestMix, make_schedule, request_body
from bench.replicas import SimSettings
from bench.scenarios.harness import MODEL, Options
from vllm_fleet.launcher.sim.capacity import saturation_rps
from vllm_fleet.launcher.sim.config import SimConfig
from vllm_fleet.launcher.sim.protocol import parse_chat

FULL = SimSettings(model=MODEL)
HALF = replace(FULL, speed=0.5)
HETEROGENEOUS = [FULL, FULL, FULL, HALF]
#: Fraction of fleet capacity scenario 1 offers.
LOAD = 0.7
#: Requests of the pilot sequence a replica's capacity is measured on: enough that the drain
#: at its end (a batch no longer full) moves the figure by about 1 %.
PILOT_REQUESTS = 800


def sim_config(settings: SimSettings) -> SimConfig:
    """The configuration `vllm-fleet sim` runs with `settings`' flags (bench.replicas)."""
    flags = {k: v for k, v in asdict(settings).items() if v is not None}
    return SimConfig(**flags)


@cache
def replica_capacity_rps(settings: SimSettings, mix: RequestMix) -> float:
    """Requests per second one simulated replica completes on `mix`'s traffic at saturation.

    Measured, not computed: the simulator's own engine runs offline over a pilot sequence of
    `mix`'s shape with every request queued at once (vllm_fleet.launcher.sim.capacity), each
    request parsed by the simulator's own parser (so its prompt tokens, and the default
    max_tokens of a request that omits it, are the replica's). That is what a user does: measure
    what the fleet serves, then offer a fraction of it. The capacity depends on the requests'
    shape, not their rate, so the pilot's rate is only there to give it `PILOT_REQUESTS`.
    """
    config = sim_config(settings)
    pilot = make_schedule(replace(mix, rate=PILOT_REQUESTS / mix.duration))
    requests = []
    for spec in pilot:
        parsed = parse_chat(request_body(spec, config.model), config)
        requests.append((parsed.prompt_token_ids, parsed.max_tokens))
    return saturation_rps(config, requests, speed=settings.speed)


def fleet_capacity_rps(fleet: Sequence[SimSettings], mix: RequestMix) -> float:
    """The fleet's requests per second at saturation: its replicas' measured capacities."""
    shape = replace(mix, rate=1.0)
    return sum(replica_capacity_rps(s, shape) for s in fleet)


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
        f"{len(fleet)} simulated replicas (speeds {speeds}; max {s0.max_num_seqs} running; "
        f"the simulator's calibrated step law (docs/simulator.md) scaled to --step-ms "
        f"{s0.step_ms:g}, --batch-slowdown {s0.batch_slowdown:g}). Poisson arrivals at "
        f"{mix.rate:.2f} req/s = {mix.rate / capacity:.0%} of the fleet's capacity "
        f"({capacity:.2f} req/s, measured on the simulator's own engine with {PILOT_REQUESTS} "
        f"requests of this shape queued at once) for {mix.duration:g} s, seed "
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
