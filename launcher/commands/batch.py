"""`vllm-fleet batch`: a file of requests in, results out, through the whole fleet.

``--endpoint`` uses a running router (or any OpenAI-compatible server); ``--config`` starts the
fleet of that fleet.yaml in the background (``up --detach``, run directory ``OUTPUT.fleet``),
runs the batch through its router and stops it (``down``), whatever happens in between.
The work itself is `vllm_fleet.launcher.batch`; this module only parses and calls.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vllm_fleet.launcher.batch import BatchOptions, PlainOptions
from vllm_fleet.launcher.batch.runner import DEFAULT_PRIORITY, PRIORITY_HEADER, run_batch_async
from vllm_fleet.launcher.config import load_config
from vllm_fleet.launcher.errors import ConfigError

#: Environment variable for the bearer key when --api-key is not given.
API_KEY_ENV = "VLLM_FLEET_API_KEY"


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "batch",
        help="run a file of requests through the fleet (resumable, adaptive concurrency)",
        description=(
            "Send every line of INPUT (OpenAI Batch JSONL, or plain prompts with --model) "
            "through the fleet and append the results to OUTPUT as they finish. Running the "
            "same command again resumes: lines that already have a result are skipped. Batch "
            f"requests carry vLLM's priority field (--priority) and {PRIORITY_HEADER}: batch."
        ),
    )
    add = parser.add_argument
    add("input", metavar="INPUT", help="OpenAI Batch JSONL file, or prompts with --model")
    add("-o", "--output", required=True, metavar="OUTPUT", help="results JSONL (appended)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--endpoint", metavar="URL", help="a running router or OpenAI-compatible server"
    )
    target.add_argument(
        "--config", metavar="FLEET.yaml", help="start this fleet, run the batch, stop the fleet"
    )
    add("--max-inflight", default="auto", metavar="auto|N",
        help="requests in flight: auto adapts to the fleet (default), N is fixed")  # fmt: skip
    add("--errors", metavar="ERRORS.jsonl",
        help="write failed lines here, not into OUTPUT (like OpenAI's error file)")  # fmt: skip
    add("--priority", type=int, default=DEFAULT_PRIORITY, metavar="N",
        help="vLLM request priority; larger runs later, interactive requests are 0 "
        f"(default {DEFAULT_PRIORITY}; 0 omits the field)")  # fmt: skip
    add("--api-key", default=None, metavar="KEY",
        help=f"bearer key for the endpoint (default: ${API_KEY_ENV})")  # fmt: skip
    add("--max-attempts", type=int, default=8, metavar="N",
        help="attempts per request on 429 / 5xx / connection errors (default 8)")  # fmt: skip
    add("--timeout", type=float, default=600.0, metavar="S",
        help="seconds one attempt may take (default 600)")  # fmt: skip
    add("--json", action="store_true", help="print the summary as one JSON object")
    add("--quiet", action="store_true", help="no progress output")
    plain = parser.add_argument_group("plain prompts (INPUT is text, or JSONL with --field)")
    plain.add_argument("--model", help="served model name; turns on plain mode")
    plain.add_argument("--system", help="system message for every prompt")
    plain.add_argument("--max-tokens", type=int, metavar="N", help="max_tokens of every request")
    plain.add_argument("--field", metavar="NAME", help="JSONL: the prompt is this field")
    plain.add_argument("--template", metavar="TEXT",
        help='JSONL: the prompt is TEXT with {field} placeholders filled')  # fmt: skip
    parser.set_defaults(func=run)


def parse_max_inflight(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError(f"--max-inflight: {value!r} is not auto or a positive integer")
    return number


def options_from_args(args: argparse.Namespace, endpoint: str) -> BatchOptions:
    plain = None
    if args.model:
        if args.field and args.template:
            raise ConfigError("--field and --template: give one (the prompt's source)")
        if args.max_tokens is not None and args.max_tokens < 1:
            raise ConfigError("--max-tokens: must be a positive integer")
        plain = PlainOptions(
            model=args.model,
            system=args.system,
            max_tokens=args.max_tokens,
            field=args.field,
            template=args.template,
        )
    elif any(getattr(args, n) is not None for n in ("system", "max_tokens", "field", "template")):
        raise ConfigError("--system/--max-tokens/--field/--template: plain mode needs --model")
    if args.max_attempts < 1:
        raise ConfigError("--max-attempts: must be at least 1")
    if args.timeout <= 0:
        raise ConfigError("--timeout: must be positive seconds")
    input_path = Path(args.input)
    if not input_path.is_file():
        raise ConfigError(f"INPUT: {input_path} is not a file; give the batch file to run")
    output = Path(args.output)
    errors = Path(args.errors) if args.errors else None
    if output.resolve() in (input_path.resolve(), errors.resolve() if errors else None):
        raise ConfigError("-o/--output: must differ from INPUT and --errors")
    return BatchOptions(
        input=input_path,
        output=output,
        endpoint=endpoint,
        errors=errors,
        max_inflight=parse_max_inflight(args.max_inflight),
        plain=plain,
        priority=args.priority,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_attempts=args.max_attempts,
        request_timeout_s=args.timeout,
        quiet=args.quiet,
    )


@contextmanager
def fleet_from_config(config_path: str, run_dir: Path) -> Iterator[str]:
    """`up --detach` this fleet.yaml, yield its router URL, always `down` it."""
    config = load_config(config_path)
    base = [sys.executable, "-m", "vllm_fleet.launcher.cli"]
    started = subprocess.run(
        [*base, "up", "--config", config_path, "--detach", "--run-dir", str(run_dir)],
        stdout=sys.stderr,
        check=False,
    )
    try:
        if started.returncode != 0:
            raise ConfigError(f"--config: the fleet did not start (see {run_dir}/logs)")
        yield config.router_url
    finally:
        subprocess.run([*base, "down", "--run-dir", str(run_dir)], stdout=sys.stderr, check=False)


def run(args: argparse.Namespace) -> int:
    if args.endpoint:
        options = options_from_args(args, args.endpoint)
        summary = asyncio.run(run_batch_async(options))
    else:
        run_dir = Path(f"{args.output}.fleet")
        with fleet_from_config(args.config, run_dir) as url:
            options = options_from_args(args, url)
            if options.api_key is None:
                keys = load_config(args.config).router.api_keys
                options = dataclasses.replace(options, api_key=keys[0] if keys else None)
            summary = asyncio.run(run_batch_async(options))
    print(summary.to_json() if args.json else summary.to_text(), flush=True)
    if summary.interrupted:
        return 130
    return 0 if summary.failed == 0 and summary.input_errors == 0 else 1
