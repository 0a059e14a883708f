"""A simulated vLLM OpenAI server (`vllm-fleet sim`) for fast router tests and benchmarks.

`engine` models continuous batching with time passed in; `runner` ticks it in real time;
`protocol` is the OpenAI wire format; `server` is the aiohttp app; `metrics` the vLLM metrics.
"""

from launcher.sim.config import SimConfig, SimKnobs
from launcher.sim.server import make_sim_app

__all__ = ["SimConfig", "SimKnobs", "make_sim_app"]
