"""Simulator settings: fixed ones (`SimConfig`) and the ones tests flip at runtime (`SimKnobs`).

The split exists because `POST /sim/control` must change speed, failures and health of a running
server without touching anything that shapes the model (batch size, context length).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from launcher.errors import ConfigError

#: Default `max_tokens` for chat completions when the request gives none. vLLM uses
#: "whatever is left of the context"; a fixed, small default keeps simulated requests short.
DEFAULT_CHAT_MAX_TOKENS = 64
#: Default `max_tokens` for (legacy) completions: the OpenAI and vLLM default.
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: Version string reported by `GET /version` (the vLLM release whose API the simulator mimics).
SIM_VLLM_VERSION = "0.32.0"


@dataclass(frozen=True)
class SimConfig:
    """Everything a simulated vLLM server needs; mirrors the `vllm-fleet sim` flags."""

    model: str = "sim-model"
    host: str = "127.0.0.1"
    port: int = 8000
    max_num_seqs: int = 16
    step_ms: float = 20.0
    batch_slowdown: float = 0.05
    prefill_ms_per_token: float = 0.0
    speed: float = 1.0
    fail_rate: float = 0.0
    startup_delay: float = 0.0
    max_model_len: int = 4096
    #: KV-cache size in tokens; `vllm:kv_cache_usage_perc` = tokens held by running requests / this.
    kv_cache_tokens: int = 65536
    seed: int = 0
    #: Length of the vectors returned by `/v1/embeddings`.
    embedding_dim: int = 32

    def __post_init__(self) -> None:
        _require(bool(self.model), "model", "give a non-empty --model name")
        _require(0 <= self.port <= 65535, "port", "use a port between 0 and 65535")
        _require(self.max_num_seqs >= 1, "max_num_seqs", "use --max-num-seqs >= 1")
        _require(self.step_ms > 0, "step_ms", "use --step-ms > 0")
        _require(self.batch_slowdown >= 0, "batch_slowdown", "use --batch-slowdown >= 0")
        _require(
            self.prefill_ms_per_token >= 0,
            "prefill_ms_per_token",
            "use --prefill-ms-per-token >= 0",
        )
        _require(self.speed > 0, "speed", "use --speed > 0 (1.0 = nominal, 0.5 = half speed)")
        _require(0 <= self.fail_rate <= 1, "fail_rate", "use --fail-rate between 0 and 1")
        _require(self.startup_delay >= 0, "startup_delay", "use --startup-delay >= 0 seconds")
        _require(self.max_model_len >= 2, "max_model_len", "use --max-model-len >= 2")
        _require(self.kv_cache_tokens >= 1, "kv_cache_tokens", "use --kv-cache-tokens >= 1")
        _require(self.embedding_dim >= 1, "embedding_dim", "use an embedding_dim >= 1")


def _require(ok: bool, name: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"sim {name}: invalid value; {fix}")


@dataclass
class SimKnobs:
    """Runtime switches for fault tests and benchmarks, changed by `POST /sim/control`."""

    speed: float = 1.0
    fail_rate: float = 0.0
    #: Accept connections but answer nothing (health and metrics included) and stall the engine
    #: until the hang is lifted; held requests then proceed (clients usually time out first).
    hang: bool = False
    #: False forces `/health` to 503 while requests are still served.
    healthy: bool = True

    @classmethod
    def from_config(cls, config: SimConfig) -> SimKnobs:
        return cls(speed=config.speed, fail_rate=config.fail_rate)

    def as_dict(self) -> dict[str, float | bool]:
        return {
            "speed": self.speed,
            "fail_rate": self.fail_rate,
            "hang": self.hang,
            "healthy": self.healthy,
        }


def apply_knobs(knobs: SimKnobs, changes: Mapping[str, object]) -> None:
    """Validate every change first, then apply all of them (a bad request changes nothing).

    Raises ValueError naming the offending knob.
    """
    validated: dict[str, float | bool] = {}
    for name, value in changes.items():
        if name in ("speed", "fail_rate"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number")
            number = float(value)
            if name == "speed" and number <= 0:
                raise ValueError("speed must be > 0")
            if name == "fail_rate" and not 0 <= number <= 1:
                raise ValueError("fail_rate must be between 0 and 1")
            validated[name] = number
        elif name in ("hang", "healthy"):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false")
            validated[name] = value
        else:
            raise ValueError(f"unknown knob {name!r}; use speed, fail_rate, hang or healthy")
    for name, value in validated.items():
        setattr(knobs, name, value)
