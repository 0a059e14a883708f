"""The `vllm-fleet` command: parses arguments and hands off to one module per subcommand.

Each subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (a callable taking the parsed namespace and returning an exit status).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.router.errors import ConfigError as RouterConfigError

#: the one-line mistakes of every subcommand: the launcher's own and the router's (`router`).
CONFIG_ERRORS = (ConfigError, RouterConfigError)

#: modules that each add one or more subcommands, in help order.
COMMAND_MODULES = (
    "vllm_fleet.launcher.commands.plan",
    "vllm_fleet.launcher.commands.up",
    "vllm_fleet.launcher.commands.status",
    "vllm_fleet.launcher.commands.down",
    "vllm_fleet.launcher.commands.demo",
    "vllm_fleet.launcher.commands.compose",
    "vllm_fleet.launcher.commands.batch",
    "vllm_fleet.launcher.commands.slurm",
    "vllm_fleet.router.cli",
    "vllm_fleet.launcher.sim.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-fleet",
        description="Serve one model from many vLLM replicas behind one OpenAI-compatible URL.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except CONFIG_ERRORS as exc:
        print(f"vllm-fleet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: the reader left, which is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
