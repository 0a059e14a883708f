"""The planned replicas' ports and command lines, from the user's options.

The vLLM command line itself is built by ``vllm_fleet.launcher.vllm_args`` (the only builder
of one); this module only hands it the plan's numbers.
"""

from __future__ import annotations

from vllm_fleet.launcher.errors import PlanError
from vllm_fleet.launcher.model_size import normalize_dtype
from vllm_fleet.launcher.plan_types import PlanOptions
from vllm_fleet.launcher.vllm_args import (
    has_kv_events_config,
    kv_events_port,
    kv_replay_port,
    scheduling_args,
    vllm_command,
)


def replica_ports(options: PlanOptions, count: int) -> list[int]:
    """One port per replica from --base-port up; a range past 65535 is the user's to fix."""
    last = options.base_port + count - 1
    if last > 65535:
        raise PlanError(
            f"--base-port {options.base_port} leaves no room for {count} replicas "
            f"(last port would be {last}); use a lower --base-port"
        )
    return [options.base_port + i for i in range(count)]


def replica_kv_events_port(options: PlanOptions, port: int) -> int | None:
    """The KV-events port of the vLLM replica serving on ``port`` (vllm_args.kv_events_port);
    None when the user's extra arguments configure events themselves."""
    if has_kv_events_config(options.extra_args):
        return None
    events = kv_events_port(port)
    replay = kv_replay_port(events)
    if replay > 65535:
        raise PlanError(
            f"--base-port {options.base_port}: replica port {port} would publish KV events on "
            f"ports {events} and {replay} (replay), past 65535; use a lower --base-port"
        )
    return events


def vllm_replica_command(
    options: PlanOptions, port: int, tp: int, max_model_len: int | None, on_gpu: bool
) -> tuple[str, ...]:
    """The replica's vLLM command line, from vllm_fleet.launcher.vllm_args (the only builder of
    one)."""
    return vllm_command(
        python=options.python,
        model=options.model,
        host=options.host,
        port=port,
        tensor_parallel_size=tp,
        served_model_name=options.served_model_name,
        dtype=normalize_dtype(options.dtype),
        max_model_len=max_model_len,
        gpu_memory_utilization=options.gpu_memory_utilization if on_gpu else None,
        max_num_seqs=options.max_num_seqs,
        on_cpu=not on_gpu,
        extra_args=options.extra_args,
        scheduling_policy=options.scheduling_policy,
        lora_modules=options.lora_modules,
        max_lora_rank=options.max_lora_rank,
        kv_events_port=replica_kv_events_port(options, port),
    )


def sim_replica_command(options: PlanOptions, port: int) -> tuple[str, ...]:
    """The simulator standing in for a replica: same host, port and model name, so the router
    and the supervisor cannot tell it from vLLM."""
    argv = [
        options.python,
        "-m",
        "vllm_fleet.launcher.cli",
        "sim",
        "--host",
        options.host,
        "--port",
        str(port),
        "--model",
        options.served_model_name or options.model,
    ]
    if options.max_model_len is not None:
        argv += ["--max-model-len", str(options.max_model_len)]
    if options.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(options.max_num_seqs)]
    if options.lora_modules:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in options.lora_modules)]
    argv += scheduling_args(options.scheduling_policy, options.extra_args)
    return (*argv, *options.extra_args)
