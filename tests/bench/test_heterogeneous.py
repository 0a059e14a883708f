"""The heterogeneous scenarios' load comes from the simulator's measured capacity, and it is a
load the simulated replicas keep up with (the old `a·(1+b·n)` sizing offered ~190 %)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bench.load import RequestMix, make_schedule, request_body
from bench.scenarios.harness import Options
from bench.scenarios.heterogeneous import (
    FULL,
    HALF,
    HETEROGENEOUS,
    LOAD,
    base_mix,
    fleet_capacity_rps,
    replica_capacity_rps,
    sim_config,
)
from vllm_fleet.launcher.sim.engine import SimEngine
from vllm_fleet.launcher.sim.protocol import parse_chat

#: A bound on the steps of the offline replay below (its few dozen requests need far fewer).
MAX_STEPS = 200_000


def _options() -> Options:
    return Options(quick=False, workdir=Path("unused"), python="unused")


def test_the_half_speed_replica_serves_half_of_a_full_one() -> None:
    shape = RequestMix(rate=1.0, duration=20.0)
    full = replica_capacity_rps(FULL, shape)
    assert abs(replica_capacity_rps(HALF, shape) - full / 2) < 1e-9 * full
    assert abs(fleet_capacity_rps(HETEROGENEOUS, shape) - 3.5 * full) < 1e-9 * full


def test_the_offered_rate_is_the_load_fraction_of_the_measured_capacity() -> None:
    mix = base_mix(_options())
    assert abs(mix.rate - LOAD * fleet_capacity_rps(HETEROGENEOUS, mix)) < 1e-9


def test_one_full_replica_keeps_up_with_its_share_of_scenario_1() -> None:
    """Replay a full-speed replica's share of scenario 1 (its arrivals at the rate times
    1/3.5) on the simulator's engine, offline: at 70 % the queue stays short; at the old
    sizing's rate it would hold dozens of requests."""
    mix = base_mix(_options())
    share = replace(mix, rate=mix.rate / 3.5)
    config = sim_config(FULL)
    arrivals = [
        (spec.at, parse_chat(request_body(spec, config.model), config))
        for spec in make_schedule(share)
    ]
    engine = SimEngine.from_config(config)
    now, next_arrival, longest_queue = 0.0, 0, 0
    for _ in range(MAX_STEPS):
        while next_arrival < len(arrivals) and arrivals[next_arrival][0] <= now:
            at, request = arrivals[next_arrival]
            engine.add(
                str(next_arrival),
                len(request.prompt_token_ids),
                request.max_tokens,
                at,
                prompt_token_ids=request.prompt_token_ids,
            )
            next_arrival += 1
        longest_queue = max(longest_queue, len(engine.waiting))
        if not engine.has_work():
            if next_arrival == len(arrivals):
                break
            now = arrivals[next_arrival][0]
            continue
        now += engine.begin_step(now, FULL.speed).duration
        engine.end_step(now)
    assert next_arrival == len(arrivals) and not engine.has_work()
    assert longest_queue <= 2, f"{longest_queue} requests waited at once"
