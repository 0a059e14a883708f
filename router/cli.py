"""``vllm-fleet router``: one OpenAI-compatible endpoint in front of many vLLM replicas."""

from __future__ import annotations

import argparse
from typing import Any

from vllm_fleet.router.config import add_arguments, config_from_args


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "router",
        help="route OpenAI API requests to the healthy vLLM replica where each finishes soonest",
        description=(
            "Serve the OpenAI API (/v1/*) from several vLLM replicas: cost-aware balancing, "
            "health checks, failover, streaming and Prometheus metrics. Every flag can also "
            "be set through the FLEET_* environment variable named in its help; flags win."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vllm_fleet.router.serve import serve  # the server stack loads only when this command runs

    return serve(config_from_args(args))
