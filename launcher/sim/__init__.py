"""A simulated vLLM OpenAI server (`vllm-fleet sim`) for fast router tests and benchmarks.

What it promises (the contract router tests rely on):
- vLLM's routes and bodies: /health (200, empty body; 503 while loading or forced unhealthy),
  /version, /v1/models, /v1/completions, /v1/chat/completions (both also streaming, one token
  per SSE chunk, `[DONE]` last, usage chunk with `stream_options.include_usage`),
  /v1/embeddings, /metrics (vLLM 0.32 metric names with `model_name` and `engine` labels).
- `max_tokens` is produced exactly (finish_reason "length"); defaults: 16 for completions, 64 for
  chat (`vllm_fleet.launcher.sim.config`). Prompts are tokenized by a fixed rule, one token per 4
  UTF-8 bytes, chats rendered like a template (`vllm_fleet.launcher.sim.tokens`).
- Errors as vLLM: 404 "The model `X` does not exist.", 400 for bad bodies and context
  overflow, 500 for the `fail_rate` fraction; always `{"error": {message, type, param, code}}`.
- Timing from a model of vLLM V1's scheduler (`vllm_fleet.launcher.sim.engine`): chunked prefill
  under a token budget, automatic prefix caching with LRU eviction and vLLM's block hashes, KV
  capacity with preemption, and a step time calibrated on real vLLM (docs/simulator.md); ticked by
  one loop per server (`vllm_fleet.launcher.sim.runner`); a disconnected client's request is aborted
  at once.
- KV-cache events in vLLM's ZMQ format with `--kv-events-config`
  (`vllm_fleet.launcher.sim.kv_events`).
- Test hooks: `GET /sim/stats` (counters) and `POST /sim/control` (speed, fail_rate, hang,
  healthy); vLLM's `POST /reset_prefix_cache` and `GET /kv_event_sources`.
  `tests/support/sim.py` wraps all of this for tests.
"""

from vllm_fleet.launcher.sim.config import SimConfig, SimKnobs
from vllm_fleet.launcher.sim.server import make_sim_app

__all__ = ["SimConfig", "SimKnobs", "make_sim_app"]
