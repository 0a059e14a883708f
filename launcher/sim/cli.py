"""`vllm-fleet sim`: run one simulated vLLM OpenAI server (for tests, demos and benchmarks)."""

from __future__ import annotations

import argparse
from typing import Any

from aiohttp import web

from vllm_fleet.launcher.sim.config import KvEventsConfig, SimConfig
from vllm_fleet.launcher.sim.lora import parse_lora_modules
from vllm_fleet.launcher.sim.scheduling import POLICIES
from vllm_fleet.launcher.sim.server import make_sim_app

#: Optional flags: (flag, type, help). Each maps to the SimConfig field of the same name.
_TUNING_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("--host", str, "address to bind"),
    ("--max-num-seqs", int, "requests decoded together per step"),
    ("--step-ms", float, "fixed milliseconds of every step; scales the whole step-time law"),
    ("--batch-slowdown", float, "step time grows by this fraction of --step-ms per request"),
    ("--speed", float, "throughput multiplier; 0.5 = half speed"),
    ("--fail-rate", float, "fraction of requests answered 500"),
    ("--startup-delay", float, "seconds /health answers 503 as if loading"),
    ("--max-model-len", int, "context length; prompt + max_tokens above it get a 400"),
    ("--kv-cache-tokens", int, "KV-cache size in tokens (num_gpu_blocks * block size)"),
    ("--block-size", int, "tokens per KV block (prefix caching works in whole blocks)"),
    ("--max-num-batched-tokens", int, "token budget of one step (chunked prefill)"),
    ("--seed", int, "seed for the --fail-rate draws"),
)
#: Flags whose default follows --step-ms (the calibrated shape): (flag, help).
_DERIVED_FLAGS: tuple[tuple[str, str], ...] = (
    ("--prefill-ms-per-token", "step milliseconds per computed token"),
    ("--attention-ms-per-ktoken", "step milliseconds per 1000 KV tokens decodes read"),
    ("--prefill-attention-ms-per-mpair", "step milliseconds per 1e6 prefill query-key pairs"),
)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "sim",
        help="run a simulated vLLM server (no GPU, no model)",
        description=(
            "Serve vLLM's OpenAI API (completions, chat, embeddings, /health, /metrics) from a "
            "continuous-batching model: filler text, realistic batching latency, fault knobs "
            "(POST /sim/control) and counters (GET /sim/stats)."
        ),
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--model", required=True, help="served model name (others get a 404)")
    defaults = SimConfig()
    for flag, kind, text in _TUNING_FLAGS:
        field = flag.removeprefix("--").replace("-", "_")
        parser.add_argument(
            flag, type=kind, default=getattr(defaults, field), help=f"{text} (default %(default)s)"
        )
    for flag, text in _DERIVED_FLAGS:
        parser.add_argument(
            flag, type=float, default=None, help=f"{text} (default: measured shape x --step-ms)"
        )
    parser.add_argument(
        "--kv-events-config",
        default=None,
        help=(
            "publish KV-cache events like vLLM, e.g. "
            '\'{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557"}\' '
            "(vLLM's JSON; endpoints with * bind, others connect)"
        ),
    )
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse cached leading KV blocks of prompts, as vLLM (default on)",
    )
    parser.add_argument(
        "--scheduling-policy",
        choices=POLICIES,
        default="fcfs",
        help="vLLM's queue order: fcfs, or priority (the body's priority field, smaller first)",
    )
    parser.add_argument(
        "--lora-modules",
        nargs="*",
        default=None,
        metavar="NAME=PATH",
        help="LoRA adapters served as models of their own name, as vLLM's flag",
    )
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        max_num_seqs=args.max_num_seqs,
        step_ms=args.step_ms,
        batch_slowdown=args.batch_slowdown,
        prefill_ms_per_token=args.prefill_ms_per_token,
        attention_ms_per_ktoken=args.attention_ms_per_ktoken,
        prefill_attention_ms_per_mpair=args.prefill_attention_ms_per_mpair,
        speed=args.speed,
        fail_rate=args.fail_rate,
        startup_delay=args.startup_delay,
        max_model_len=args.max_model_len,
        kv_cache_tokens=args.kv_cache_tokens,
        block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        scheduling_policy=args.scheduling_policy,
        kv_events=KvEventsConfig.parse(args.kv_events_config) if args.kv_events_config else None,
        seed=args.seed,
        lora_modules=parse_lora_modules(args.lora_modules),
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    web.run_app(
        make_sim_app(config),
        host=config.host,
        port=config.port,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=1.0,
        print=lambda _: print(
            f"vllm-fleet sim: serving {config.model} on http://{config.host}:{config.port}",
            flush=True,
        ),
    )
    return 0
