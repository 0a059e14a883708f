"""The models of a fleet file, resolved: ``models:`` entries (or the single-model form) with the
file's shared values filled in, checked across entries, as the planner's ``ModelRequest``s.

Each entry's own mistakes (types, ranges, unknown keys) are caught by ``config``; what needs
several fields or several entries at once is checked here, each as one line naming the field
and the fix.
"""

from __future__ import annotations

import re
import sys

from vllm_fleet.launcher.config import FleetConfig, ModelConfig
from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.model_size import normalize_dtype
from vllm_fleet.launcher.plan_types import ModelRequest, PlanOptions

#: a LoRA adapter's name is a model id clients send; vLLM splits --lora-modules on "=".
_LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")

#: top-level keys of the single-model form that a models: entry replaces.
_PER_MODEL_ONLY = ("model", "served_model_name", "replicas", "tensor_parallel_size")


def model_label(config: FleetConfig) -> str:
    """The fleet's models as `status` and state.json name them."""
    return ", ".join(r.name for r in resolve_models(config))


def resolve_models(config: FleetConfig, source: str = "fleet.yaml") -> tuple[ModelRequest, ...]:
    """The fleet's models, as many as ``models:`` lists (one in the single-model form)."""
    if not config.models:
        _check_lora(config.lora_modules, "lora_modules", source, ())
        return (ModelRequest(config.to_plan_options(), replicas=config.replicas),)
    for key in _PER_MODEL_ONLY:
        if getattr(config, key) is not None:
            raise ConfigError(
                f"{source}: {key}: set per model when models: is given; move it into each "
                "entry of models: (or drop models: for a single model)"
            )
    if config.lora_modules:
        raise ConfigError(
            f"{source}: lora_modules: set per model when models: is given; move it into the "
            "models: entry whose base model the adapters fit"
        )
    requests = [_request(config, entry, i, source) for i, entry in enumerate(config.models)]
    served: dict[str, int] = {}
    for i, req in enumerate(requests):
        names = [req.name, *(name for name, _ in req.options.lora_modules)]
        for name in names:
            if name in served:
                raise ConfigError(
                    f"{source}: models[{i}]: the name {name!r} is already served by "
                    f"models[{served[name]}]; give each model and adapter its own name "
                    "(served_model_name:, lora_modules:)"
                )
            served[name] = i
    return tuple(requests)


def _request(config: FleetConfig, entry: ModelConfig, i: int, source: str) -> ModelRequest:
    where = f"{source}: models[{i}]"
    engine = entry.engine or config.engine
    if not entry.model and not (engine == "sim" and entry.served_model_name):
        raise ConfigError(
            f"{where}.model: required; a Hugging Face name or local directory, e.g. "
            "models: [{model: Qwen/Qwen2.5-7B-Instruct}]"
        )
    if entry.gpus is not None and entry.replicas is not None:
        raise ConfigError(
            f"{where}: replicas and gpus both set; give replicas (with tensor_parallel_size) "
            "or gpus (a count or ids), not both"
        )
    if entry.gpus is not None and engine == "sim":
        raise ConfigError(f"{where}.gpus: the sim engine uses no GPU; use replicas: instead")
    ids = entry.gpus if isinstance(entry.gpus, tuple) else ()
    tp = entry.tensor_parallel_size
    if ids and tp and len(ids) % tp:
        raise ConfigError(
            f"{where}.gpus: {len(ids)} GPUs do not split into TP{tp} replicas; list a multiple "
            f"of {tp} GPUs or change tensor_parallel_size"
        )
    _check_lora(entry.lora_modules, f"models[{i}].lora_modules", source, entry.extra_args or ())
    dtype = entry.dtype or config.dtype
    options = PlanOptions(
        model=entry.model or entry.served_model_name or "",
        engine=engine,
        served_model_name=entry.served_model_name,
        dtype=normalize_dtype(dtype, where=f"{where}.dtype:"),
        max_model_len=entry.max_model_len or config.max_model_len,
        gpu_memory_utilization=entry.gpu_memory_utilization or config.gpu_memory_utilization,
        max_num_seqs=entry.max_num_seqs or config.max_num_seqs,
        tensor_parallel_size=tp,
        base_port=config.base_port,
        host=config.host,
        extra_args=entry.extra_args if entry.extra_args is not None else config.extra_args,
        env={**config.env, **entry.env},
        python=sys.executable,
        lora_modules=tuple(entry.lora_modules.items()),
        scheduling_policy=config.scheduling_policy,
        max_lora_rank=entry.max_lora_rank,
    )
    return ModelRequest(
        options=options,
        replicas=entry.replicas,
        gpu_ids=ids,
        gpu_count=entry.gpus if isinstance(entry.gpus, int) else None,
    )


def _check_lora(modules: dict[str, str], key: str, source: str, extra: tuple[str, ...]) -> None:
    for name, path in modules.items():
        if not _LORA_NAME.match(name):
            raise ConfigError(
                f"{source}: {key}: adapter name {name!r} must start with a letter or digit and "
                "hold no spaces or '=', e.g. lora_modules: {sql-lora: /adapters/sql}"
            )
        if not path.strip():
            raise ConfigError(
                f"{source}: {key}.{name}: empty path; give the adapter's local directory or "
                "Hugging Face id"
            )
    if modules and any(a.split("=", 1)[0] == "--lora-modules" for a in extra):
        raise ConfigError(
            f"{source}: {key}: adapters also given as --lora-modules in extra_args; list them "
            "in lora_modules only"
        )
