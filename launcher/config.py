"""The fleet file (``fleet.yaml``): one frozen ``FleetConfig`` that flags can override.

Validation is driven by the dataclass type hints so a new key is one line here; every mistake is
reported as ONE line naming the key path and the fix, because a traceback from a YAML typo is
the first thing a new user would otherwise see.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.slurm.settings import SlurmSettings

if typing.TYPE_CHECKING:
    from vllm_fleet.launcher.planner import PlanOptions

Engine = Literal["vllm", "sim"]
RuntimeKind = Literal["process", "docker"]
SchedulingPolicy = Literal["fcfs", "priority"]

Check = Callable[[Any], str | None]


def _at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low:g}"


def _port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else "must be a TCP port between 1 and 65535"


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1], e.g. 0.9"


def _image(v: str) -> str | None:
    if v and not any(c.isspace() for c in v):
        return None
    return "must be a Docker image reference, e.g. vllm/vllm-openai:v0.32.0"


def _opt(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _known_policy(name: str) -> str | None:
    from vllm_fleet.router.balancer import policy_names

    names = policy_names()
    return None if name in names else f"unknown policy; use one of {', '.join(names)}"


def _router_workers(v: int | str) -> str | None:
    from vllm_fleet.router.config import MAX_WORKERS

    if v == "auto" or (isinstance(v, int) and 1 <= v <= MAX_WORKERS):
        return None
    return f"must be 1-{MAX_WORKERS} router processes or auto (the cores it may use)"


def _meta(example: str, check: Check | None = None) -> dict[str, Any]:
    return {"example": example, "check": check}


@dataclass(frozen=True)
class RouterLaunchConfig:
    """How the fleet starts its router (the ``router:`` section of fleet.yaml): the few flags
    the launcher sets on the router's command line. The router's own, complete configuration
    is ``vllm_fleet.router.config.RouterConfig``, built from that command line by the router
    process."""

    port: int = field(default=8000, metadata=_meta("router: {port: 8000}", _port))
    host: str = field(default="127.0.0.1", metadata=_meta("router: {host: 0.0.0.0}"))
    #: balancing policy name understood by the router; None keeps the router's default.
    policy: str | None = field(
        default=None, metadata=_meta("router: {policy: least-busy}", _opt(_known_policy))
    )
    #: bearer tokens the router accepts; empty means no authentication.
    api_keys: tuple[str, ...] = field(default=(), metadata=_meta("router: {api_keys: [sk-1]}"))
    #: router processes on the port (its --workers): a count, or auto (the cores it may use).
    workers: int | Literal["auto"] = field(
        default=1, metadata=_meta("router: {workers: 2}", _router_workers)
    )
    #: extra flags appended verbatim to the router command.
    extra_args: tuple[str, ...] = field(
        default=(), metadata=_meta("router: {extra_args: ['--log-level', 'debug']}")
    )


@dataclass(frozen=True)
class RestartConfig:
    """Crash-loop protection: at most ``max_restarts`` within ``window_s``, then FAILED."""

    max_restarts: int = field(default=5, metadata=_meta("restart: {max_restarts: 5}", _at_least(0)))
    backoff_initial_s: float = field(
        default=1.0, metadata=_meta("restart: {backoff_initial_s: 1.0}", _at_least(0))
    )
    backoff_max_s: float = field(
        default=60.0, metadata=_meta("restart: {backoff_max_s: 60}", _at_least(0))
    )
    window_s: float = field(default=600.0, metadata=_meta("restart: {window_s: 600}", _at_least(0)))


def _replicas(v: int | str) -> str | None:
    return None if v == "auto" or (isinstance(v, int) and v >= 1) else "must be >= 1 or auto"


def _gpus(v: int | tuple[int, ...]) -> str | None:
    if isinstance(v, int):
        return None if v >= 1 else "must be a GPU count >= 1 or a list of GPU ids, e.g. [0, 1]"
    if not v or min(v) < 0 or len(set(v)) != len(v):
        return "must list distinct GPU ids >= 0, e.g. [0, 1], or be a count"
    return None


@dataclass(frozen=True)
class ModelConfig:
    """One entry of ``models:`` (vllm_fleet.launcher.fleet_models resolves it): a field left
    unset takes the file's top-level value, so what all models share is written once."""

    model: str = field(default="", metadata=_meta("models: [{model: Qwen/Qwen2.5-7B-Instruct}]"))
    served_model_name: str | None = field(default=None, metadata=_meta("served_model_name: chat"))
    #: a count, or auto: as many as fit on the GPUs no other model takes.
    replicas: int | Literal["auto"] | None = field(
        default=None, metadata=_meta("replicas: auto", _opt(_replicas))
    )
    tensor_parallel_size: int | None = field(
        default=None, metadata=_meta("tensor_parallel_size: 2", _opt(_at_least(1)))
    )
    #: the GPUs this model gets in all: a count, or explicit ids (instead of replicas).
    gpus: int | tuple[int, ...] | None = field(
        default=None, metadata=_meta("gpus: [0, 1]", _opt(_gpus))
    )
    max_model_len: int | None = field(
        default=None, metadata=_meta("max_model_len: 8192", _opt(_at_least(1)))
    )
    gpu_memory_utilization: float | None = field(
        default=None, metadata=_meta("gpu_memory_utilization: 0.9", _opt(_fraction))
    )
    max_num_seqs: int | None = field(
        default=None, metadata=_meta("max_num_seqs: 256", _opt(_at_least(1)))
    )
    dtype: str | None = field(default=None, metadata=_meta("dtype: bfloat16"))
    extra_args: tuple[str, ...] | None = field(
        default=None, metadata=_meta("extra_args: ['--enable-prefix-caching']")
    )
    #: merged over the top-level env.
    env: dict[str, str] = field(default_factory=dict, metadata=_meta("env: {HF_HOME: /hf}"))
    engine: Engine | None = field(default=None, metadata=_meta("engine: sim"))
    #: LoRA adapters served at start: name -> local path or Hugging Face id.
    lora_modules: dict[str, str] = field(
        default_factory=dict, metadata=_meta("lora_modules: {sql: /adapters/sql}")
    )
    max_lora_rank: int | None = field(
        default=None, metadata=_meta("max_lora_rank: 16", _opt(_at_least(1)))
    )


@dataclass(frozen=True)
class FleetConfig:
    model: str | None = field(default=None, metadata=_meta("model: Qwen/Qwen2.5-7B-Instruct"))
    #: several models in one fleet; leave model: unset then (fleet_models.resolve_models).
    models: tuple[ModelConfig, ...] = field(
        default=(), metadata=_meta("models: [{model: Qwen/Qwen2.5-7B-Instruct, replicas: 2}]")
    )
    served_model_name: str | None = field(default=None, metadata=_meta("served_model_name: chat"))
    dtype: str = field(default="auto", metadata=_meta("dtype: bfloat16"))
    max_model_len: int | None = field(
        default=None, metadata=_meta("max_model_len: 8192", _opt(_at_least(1)))
    )
    gpu_memory_utilization: float = field(
        default=0.9, metadata=_meta("gpu_memory_utilization: 0.9", _fraction)
    )
    max_num_seqs: int | None = field(
        default=None, metadata=_meta("max_num_seqs: 256", _opt(_at_least(1)))
    )
    #: extra flags appended verbatim to every engine command.
    extra_args: tuple[str, ...] = field(
        default=(), metadata=_meta("extra_args: ['--enable-prefix-caching']")
    )
    env: dict[str, str] = field(default_factory=dict, metadata=_meta("env: {HF_HOME: /data/hf}"))
    base_port: int = field(default=8001, metadata=_meta("base_port: 8001", _port))
    #: address the engine servers bind to.
    host: str = field(default="127.0.0.1", metadata=_meta("host: 127.0.0.1"))
    router: RouterLaunchConfig = field(
        default_factory=RouterLaunchConfig, metadata=_meta("router: {port: 8000}")
    )
    replicas: int | None = field(default=None, metadata=_meta("replicas: 2", _opt(_at_least(1))))
    tensor_parallel_size: int | None = field(
        default=None, metadata=_meta("tensor_parallel_size: 2", _opt(_at_least(1)))
    )
    engine: Engine = field(default="vllm", metadata=_meta("engine: vllm"))
    #: vLLM's --scheduling-policy for every engine (sim too): priority runs batch requests
    #: (vllm-fleet batch sets their priority low) behind interactive ones (docs/batch.md).
    scheduling_policy: SchedulingPolicy = field(
        default="fcfs", metadata=_meta("scheduling_policy: priority")
    )
    #: LoRA adapters of the single-model form (models: entries have their own).
    lora_modules: dict[str, str] = field(
        default_factory=dict, metadata=_meta("lora_modules: {sql: /adapters/sql}")
    )
    max_lora_rank: int | None = field(
        default=None, metadata=_meta("max_lora_rank: 16", _opt(_at_least(1)))
    )
    #: process: each replica is a local process group; docker: each replica is a container
    #: (vllm_fleet.launcher.runtime.docker), the router stays a local process.
    runtime: RuntimeKind = field(default="process", metadata=_meta("runtime: docker"))
    #: engine image of ``runtime: docker`` replicas; None: the Docker runtime's default for the
    #: plan (the official vLLM image on GPUs, vllm-fleet-engine-cpu without; the router image,
    #: which carries the simulator, for the sim engine).
    image: str | None = field(
        default=None, metadata=_meta("image: vllm-fleet-engine-cpu:0.1.0", _opt(_image))
    )
    #: declared inventory ("8x80GB") or one entry per GPU; None detects the GPUs.
    gpus: str | tuple[str, ...] | None = field(default=None, metadata=_meta("gpus: 8x80GB"))
    run_dir: str = field(default=".fleet", metadata=_meta("run_dir: .fleet"))
    restart: RestartConfig = field(
        default_factory=RestartConfig, metadata=_meta("restart: {max_restarts: 5}")
    )
    #: how long one replica may take from start to its first healthy /health.
    health_timeout_s: float = field(
        default=900.0, metadata=_meta("health_timeout_s: 900", _at_least(0.1))
    )
    health_interval_s: float = field(
        default=2.0, metadata=_meta("health_interval_s: 2", _at_least(0.01))
    )
    #: consecutive failed health checks after which a running replica is restarted.
    unhealthy_threshold: int = field(
        default=3, metadata=_meta("unhealthy_threshold: 3", _at_least(1))
    )
    #: grace period between SIGTERM and SIGKILL when stopping a process group.
    stop_timeout_s: float = field(default=30.0, metadata=_meta("stop_timeout_s: 30", _at_least(0)))
    #: how the fleet runs as a SLURM job (`vllm-fleet slurm`; vllm_fleet.launcher.slurm.settings).
    slurm: SlurmSettings = field(
        default_factory=SlurmSettings, metadata=_meta("slurm: {partition: gpu}")
    )

    @property
    def router_url(self) -> str:
        host = "127.0.0.1" if self.router.host in ("0.0.0.0", "::", "") else self.router.host
        return f"http://{host}:{self.router.port}"

    def with_overrides(self, values: Mapping[str, Any]) -> FleetConfig:
        """Flags win over the file. Keys are key paths ("replicas", "router.port"); ``None``
        means "flag not given" and keeps the file's value."""
        data = config_to_mapping(self)
        for key, value in values.items():
            if value is None:
                continue
            section, _, name = key.rpartition(".")
            target = data[section] if section else data
            target[name] = list(value) if isinstance(value, tuple) else value
        return from_mapping(data, source="command line")

    def to_plan_options(self) -> PlanOptions:
        from vllm_fleet.launcher.model_size import normalize_dtype
        from vllm_fleet.launcher.planner import PlanOptions

        return PlanOptions(
            model=self.model or "",
            engine=self.engine,
            served_model_name=self.served_model_name,
            dtype=normalize_dtype(self.dtype, where="dtype:"),
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_num_seqs=self.max_num_seqs,
            tensor_parallel_size=self.tensor_parallel_size,
            replicas=self.replicas,
            base_port=self.base_port,
            host=self.host,
            extra_args=self.extra_args,
            env=dict(self.env),
            python=sys.executable,
            lora_modules=tuple(self.lora_modules.items()),
            max_lora_rank=self.max_lora_rank,
            scheduling_policy=self.scheduling_policy,
        )


def config_to_mapping(config: FleetConfig) -> dict[str, Any]:
    """Plain YAML-safe data (lists, not tuples) that ``from_mapping`` turns back into ``config``."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    result: dict[str, Any] = plain(dataclasses.asdict(config))
    return result


def parse_flag(key: str, raw: Any, flag: str) -> Any:
    """A command-line value for fleet key ``key`` ("replicas", "router.port"), typed and checked
    exactly like the file's, with errors naming the flag (``--replicas: expected ...``)."""
    cls: type[Any] = FleetConfig
    section, _, name = key.rpartition(".")
    if section:
        cls = typing.get_type_hints(FleetConfig)[section]
    hint = typing.get_type_hints(cls)[name]
    value = _from_text(raw, hint) if isinstance(raw, str) else raw
    try:
        value = _coerce(value, hint, flag, "command line")
    except _Mismatch:
        raise ConfigError(f"{flag}: expected {_describe(hint)}, got {raw!r}") from None
    check = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("check")
    problem = check(value) if check is not None else None
    if problem:
        raise ConfigError(f"{flag}: {problem}, got {raw!r}")
    return value


def _from_text(raw: str, hint: Any) -> Any:
    """Flags arrive as text; numbers are parsed only where the key wants a number."""
    options = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (types.UnionType, typing.Union)
        else (hint,)
    )
    for kind in (int, float):
        if kind in options:
            try:
                return kind(raw)
            except ValueError:
                continue
    return raw


def load_config(path: str | Path) -> FleetConfig:
    """Read and validate a fleet file; any problem becomes a one-line ``ConfigError``."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"{source}: cannot read ({exc.strerror}); check the --config path"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: {problem}{where}; fix the YAML syntax") from None
    if data is None:
        data = {}
    return from_mapping(data, source=source)


def from_mapping(data: object, source: str = "fleet.yaml") -> FleetConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping of keys (e.g. model: ...) at the top level"
        )
    return _build(FleetConfig, data, path="", source=source)


_T = typing.TypeVar("_T")


def _build(cls: type[_T], data: Mapping[Any, Any], path: str, source: str) -> _T:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, raw in data.items():
        key_path = f"{path}{key}"
        if not isinstance(key, str) or key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = (
                f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(fields)}"
            )
            raise ConfigError(f"{source}: {key_path}: unknown key{hint}")
        f = fields[key]
        value = _convert(raw, hints[key], key_path, source, f.metadata.get("example", ""))
        check = f.metadata.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{source}: {key_path}: {problem}, got {raw!r}")
        values[key] = value
    return cls(**values)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_describe(a) for a in options)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(item):
            return "a list of mappings"
        return "a list of " + {int: "integers", float: "numbers"}.get(item, "strings")
    if origin is dict:
        return "a mapping of strings to strings"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        hint, str(hint)
    )


class _Mismatch(Exception):
    pass


def _convert(raw: Any, hint: Any, path: str, source: str, example: str) -> Any:
    try:
        return _coerce(raw, hint, path, source)
    except _Mismatch:
        fix = f" (e.g. {example})" if example else ""
        raise ConfigError(
            f"{source}: {path}: expected {_describe(hint)}, got {raw!r}{fix}"
        ) from None


def _coerce(raw: Any, hint: Any, path: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is type(None):
        if raw is None:
            return None
        raise _Mismatch
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(hint):
            try:
                return _coerce(raw, option, path, source)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if raw in typing.get_args(hint):
            return raw
        raise _Mismatch
    if origin is tuple:
        if not isinstance(raw, list | tuple):
            raise _Mismatch
        item_hint = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(item_hint):  # models: [...]: errors say models[1].gpus
            return tuple(_coerce(v, item_hint, f"{path}[{i}]", source) for i, v in enumerate(raw))
        return tuple(_coerce(item, item_hint, path, source) for item in raw)
    if origin is dict:
        if not isinstance(raw, Mapping):
            raise _Mismatch
        # Environment values are strings to the OS; accept YAML scalars written without quotes.
        if not all(
            isinstance(v, str | int | float) and not isinstance(v, bool) for v in raw.values()
        ):
            raise _Mismatch
        return {str(k): str(v) for k, v in raw.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(raw, Mapping):
            raise _Mismatch
        return _build(typing.cast(type[Any], hint), raw, path=f"{path}.", source=source)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        raise _Mismatch
    if hint is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        raise _Mismatch
    if hint is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw)
        raise _Mismatch
    if hint is str:
        if isinstance(raw, str):
            return raw
        raise _Mismatch
    raise _Mismatch
