"""How many requests per second a simulated replica finishes at saturation, for a given traffic.

Why: a benchmark offers a fraction of the fleet's capacity, and with the calibrated law a step's
cost depends on the prompts and contexts in the batch, not only on its size; no closed formula
gives the capacity any more. So run the simulator's own engine offline (no clock, no sockets)
with every request queued at once and measure: that is the capacity the same simulator serves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vllm_fleet.launcher.sim.config import SimConfig
from vllm_fleet.launcher.sim.engine import SimEngine

#: Steps after which the run gives up (a bound; a few thousand requests need far fewer).
MAX_STEPS = 10_000_000


def saturation_rps(
    config: SimConfig, requests: Iterable[tuple[Sequence[int], int]], speed: float = 1.0
) -> float:
    """Requests per second `config`'s replica completes with all `requests` queued at once.

    `requests` are (prompt token ids, max_tokens), e.g. from `vllm_fleet.launcher.sim.protocol`
    parsing the bodies a benchmark sends; shared prefixes then count as they would on the replica.
    """
    engine = SimEngine.from_config(config)
    count = 0
    for index, (prompt, max_tokens) in enumerate(requests):
        engine.add(str(index), len(prompt), max_tokens, 0.0, prompt_token_ids=prompt)
        count += 1
    if count == 0:
        raise ValueError("saturation_rps needs at least one request")
    now = 0.0
    for _ in range(MAX_STEPS):
        if not engine.has_work():
            return count / now
        plan = engine.begin_step(now, speed)
        now += plan.duration
        engine.end_step(now)
    raise RuntimeError(f"the engine did not drain {count} requests in {MAX_STEPS} steps")
