"""The router's settings: one frozen RouterConfig built from flags, then FLEET_* variables.

Every setting is one row of OPTIONS (flag, environment variable, parser, help), so the
argparse flags, the environment variables and their validation cannot drift apart. A flag
beats its variable, which beats the dataclass default. A bad value is a ConfigError naming the
flag or variable that carried it and the fix, because that is what the user has to edit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_fleet.router.balancer import policy_names
from vllm_fleet.router.discovery import validate_backend_url
from vllm_fleet.router.errors import ConfigError
from vllm_fleet.router.kv_events import parse_kv_events_spec

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class RouterConfig:
    """Everything ``make_app`` and ``serve`` need; build it with ``config_from_args``."""

    #: Static replica base URLs (``http://host:port``).
    backends: tuple[str, ...] = ()
    #: File listing replica URLs (one per line or a YAML list), re-read on change.
    backends_file: str | None = None
    #: DNS name whose A/AAAA records are the replicas, and their port.
    discover_dns: tuple[str, int] | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    #: Client keys accepted as ``Authorization: Bearer <key>``; empty = no authentication.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    #: Keys for the admin endpoints (/fleet/*, /metrics); empty = /fleet/* takes the client
    #: keys and /metrics stays open (Prometheus scrapers seldom carry tokens).
    admin_api_keys: tuple[str, ...] = field(default=(), repr=False)
    #: Key the router sends to the replicas (vLLM ``--api-key``); None = send none.
    upstream_api_key: str | None = field(default=None, repr=False)
    #: Balancing policy (vllm_fleet.router.balancer.POLICIES). "cost" beat "least-busy" in the
    #: benchmark: mean x0.96 and p99 x0.63 of the least-busy ideal against x1.00 and x0.97 (scenario
    #: 1, docs/benchmarks.md).
    policy: str = "cost"
    max_body_bytes: int = 32 * 1024 * 1024
    #: Longest a client may take to send its request body (408 after): a client trickling a
    #: body byte by byte (slowloris) must not hold a connection and a handler forever.
    body_timeout_s: float = 60.0
    #: Replicas tried per request before giving up (1 = no failover).
    max_attempts: int = 3
    connect_timeout_s: float = 5.0
    #: Longest an upstream may stay silent: before its response headers, and between stream
    #: chunks. vLLM sends a non-streaming response only when generation ends, so this bounds
    #: the longest non-streaming completion too.
    first_byte_timeout_s: float = 600.0
    health_interval_s: float = 1.0
    health_timeout_s: float = 2.0
    scrape_interval_s: float = 1.0
    discovery_interval_s: float = 5.0
    #: Consecutive gateway failures (refused, reset, timeout, 502/503/504) that eject a
    #: replica, and the first cool-down before a re-probe. A plain 500 is the request's problem
    #: and does not count (vllm_fleet.router.outliers).
    failure_threshold: int = 3
    breaker_cooldown_s: float = 1.0
    #: Most of the fleet the breaker may hold out at once (at least one replica), as Envoy's
    #: max_ejection_percent: one client's poison requests must never eject the whole fleet.
    max_ejection_percent: float = 50.0
    #: On SIGTERM, how long in-flight requests and streams may still run.
    shutdown_grace_s: float = 30.0
    #: Continue a stream cut by a dying replica on another one (vllm_fleet.router.continuation);
    #: exact (same id, token counts, usage) or not attempted, so on by default.
    stream_continuation: bool = True
    #: Memory (MB) the approximate prefix index may use over all replicas
    #: (vllm_fleet.router.prefix_index).
    prefix_index_mb: int = 64
    #: Where each replica publishes vLLM KV events (vllm_fleet.router.kv_events): "auto" asks each
    #: replica (GET /kv_event_sources), a bare PORT means the replica's own host at that port,
    #: REPLICA_URL=tcp://HOST:PORT names one replica's.
    kv_events: tuple[str, ...] = ()
    #: Other routers in front of the same replicas (vllm_fleet.router.peers): named by URL, or
    #: found as the addresses of a DNS name (a headless service over the router pods).
    peers: tuple[str, ...] = ()
    discover_peers_dns: tuple[str, int] | None = None
    log_level: str = "info"
    log_format: str = "text"
    #: Router processes serving the port (vllm_fleet.router.workers); 1 = this process alone.
    workers: int = 1

    def __post_init__(self) -> None:
        for opt in OPTIONS:
            value = getattr(self, opt.field)
            if value is None:
                continue
            try:
                opt.check(value)
            except ValueError as exc:
                raise ConfigError(f"{opt.flag} / {opt.env}: {exc}") from None
        if not (self.backends or self.backends_file or self.discover_dns):
            raise ConfigError(
                "no replicas: pass --backend URL (repeatable), --backends-file PATH or "
                "--discover-dns NAME:PORT (or set FLEET_BACKENDS, FLEET_BACKENDS_FILE, "
                "FLEET_DISCOVER_DNS)"
            )


# -- parsing and checking of single values -------------------------------------------------


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None


def _number(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _words(text: str) -> tuple[str, ...]:
    """Comma-separated values. An empty entry is an error, not skipped: ``--api-key "$KEY"``
    with KEY unset must not quietly turn authentication off."""
    words = tuple(w.strip() for w in text.split(","))
    if not all(words):
        raise ValueError(f"{text!r} has an empty entry; give non-empty values separated by commas")
    return words


#: Most router processes --workers may start (the shared board has one row per worker).
MAX_WORKERS = 64


def _workers(text: str) -> int:
    """A count, or ``auto``: the cores this process may run on (its CPU affinity, which
    taskset, cgroups' cpusets and Kubernetes' static CPU manager narrow)."""
    if text.strip().lower() == "auto":
        return len(os.sched_getaffinity(0))
    return _int(text)


def _worker_count(value: int) -> None:
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"must be 1-{MAX_WORKERS} or auto (got {value})")


def _dns(text: str) -> tuple[str, int]:
    name, sep, port = text.strip().rpartition(":")
    if not sep or not name:
        raise ValueError(f"{text!r} is not NAME:PORT, e.g. vllm.default.svc:8000")
    return name, _int(port)


def _text(text: str) -> str:
    return text.strip()


_SWITCH = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


def _on_off(text: str) -> bool:
    try:
        return _SWITCH[text.strip().lower()]
    except KeyError:
        raise ValueError(f"{text!r} is not on or off") from None


def _positive(value: float) -> None:
    if not value > 0:
        raise ValueError(f"must be > 0 (got {value:g})")


def _percent(value: float) -> None:
    if not 0 <= value <= 100:
        raise ValueError(f"must be a percentage 0-100 (got {value:g})")


def _at_least_one(value: int) -> None:
    if value < 1:
        raise ValueError(f"must be >= 1 (got {value})")


def _port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a TCP port 0-65535 (got {value})")


def _one_of(choices: Sequence[str]) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"unknown value {value!r}; choose one of: {', '.join(choices)}")

    return check


def _policy(value: str) -> None:
    _one_of(policy_names())(value)


def _backends(value: tuple[str, ...]) -> None:
    for url in value:
        validate_backend_url(url)


def _dns_port(value: tuple[str, int]) -> None:
    _port(value[1])


def _nonempty(value: str) -> None:
    if not value:
        raise ValueError("must not be empty")


def _keys(value: tuple[str, ...]) -> None:
    if any(not k for k in value):
        raise ValueError("an API key must not be empty")


def _kv_events(value: tuple[str, ...]) -> None:
    parse_kv_events_spec(value)


def _no_check(value: Any) -> None:
    return None


@dataclass(frozen=True)
class Option:
    """One setting: where it comes from and how it is parsed and checked."""

    field: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    check: Callable[[Any], None]
    help: str
    metavar: str = ""
    #: The flag may repeat (values accumulate); its variable is comma-separated.
    repeatable: bool = False


OPTIONS: tuple[Option, ...] = (
    Option(
        "backends", "--backend", "FLEET_BACKENDS", _words, _backends,
        "replica base URL, e.g. http://127.0.0.1:8001 (repeatable; env: comma-separated)",
        "URL", repeatable=True,
    ),
    Option(
        "backends_file", "--backends-file", "FLEET_BACKENDS_FILE", _text, _nonempty,
        "file listing replica URLs, re-read when it changes", "PATH",
    ),
    Option(
        "discover_dns", "--discover-dns", "FLEET_DISCOVER_DNS", _dns, _dns_port,
        "DNS name whose addresses are the replicas, with their port", "NAME:PORT",
    ),
    Option("host", "--host", "FLEET_HOST", _text, _nonempty, "address to listen on", "ADDR"),
    Option("port", "--port", "FLEET_PORT", _int, _port, "port to listen on", "PORT"),
    Option(
        "api_keys", "--api-key", "FLEET_API_KEYS", _words, _keys,
        "accept only clients sending 'Authorization: Bearer KEY' (repeatable; env: "
        "comma-separated)", "KEY", repeatable=True,
    ),
    Option(
        "admin_api_keys", "--admin-api-key", "FLEET_ADMIN_API_KEYS", _words, _keys,
        "protect /fleet/* and /metrics with their own keys ('Authorization: Bearer KEY'; "
        "repeatable; env: comma-separated)", "KEY", repeatable=True,
    ),
    Option(
        "upstream_api_key", "--upstream-api-key", "FLEET_UPSTREAM_API_KEY", _text, _nonempty,
        "API key to send to the replicas (their vLLM --api-key)", "KEY",
    ),
    Option(
        "policy", "--policy", "FLEET_POLICY", _text, _policy,
        "balancing policy: " + ", ".join(policy_names()), "NAME",
    ),
    Option(
        "max_body_bytes", "--max-body-bytes", "FLEET_MAX_BODY_BYTES", _int, _at_least_one,
        "largest request body accepted (413 above it)", "N",
    ),
    Option(
        "body_timeout_s", "--body-timeout", "FLEET_BODY_TIMEOUT", _float, _positive,
        "seconds a client may take to send its request body (408 after)", "S",
    ),
    Option(
        "max_attempts", "--max-attempts", "FLEET_MAX_ATTEMPTS", _int, _at_least_one,
        "replicas tried per request before failing it (failover)", "N",
    ),
    Option(
        "connect_timeout_s", "--connect-timeout", "FLEET_CONNECT_TIMEOUT", _float, _positive,
        "seconds to open a connection to a replica before trying another", "S",
    ),
    Option(
        "first_byte_timeout_s", "--first-byte-timeout", "FLEET_FIRST_BYTE_TIMEOUT", _float,
        _positive,
        "seconds a replica may stay silent (before its response headers, or between stream "
        "chunks) before the attempt fails; bounds non-streaming completions too", "S",
    ),
    Option(
        "health_interval_s", "--health-interval", "FLEET_HEALTH_INTERVAL", _float, _positive,
        "seconds between active health checks of each replica", "S",
    ),
    Option(
        "health_timeout_s", "--health-timeout", "FLEET_HEALTH_TIMEOUT", _float, _positive,
        "seconds a health check may take", "S",
    ),
    Option(
        "scrape_interval_s", "--scrape-interval", "FLEET_SCRAPE_INTERVAL", _float, _positive,
        "seconds between scrapes of each replica's /metrics", "S",
    ),
    Option(
        "discovery_interval_s", "--discovery-interval", "FLEET_DISCOVERY_INTERVAL", _float,
        _positive, "seconds between re-reads of the backends file / DNS", "S",
    ),
    Option(
        "failure_threshold", "--failure-threshold", "FLEET_FAILURE_THRESHOLD", _int,
        _at_least_one,
        "consecutive gateway failures (refused, reset, timeout, 502/503/504) that eject a "
        "replica", "N",
    ),
    Option(
        "max_ejection_percent", "--max-ejection-percent", "FLEET_MAX_EJECTION_PERCENT",
        _number, _percent,
        "most of the fleet (percent, at least one replica) failed requests may eject at once",
        "PCT",
    ),
    Option(
        "breaker_cooldown_s", "--breaker-cooldown", "FLEET_BREAKER_COOLDOWN", _float, _positive,
        "seconds an ejected replica rests before it is probed again", "S",
    ),
    Option(
        "shutdown_grace_s", "--shutdown-grace", "FLEET_SHUTDOWN_GRACE", _float, _positive,
        "on SIGTERM, seconds in-flight requests may still run before they are cut", "S",
    ),
    Option(
        "prefix_index_mb", "--prefix-index-memory", "FLEET_PREFIX_INDEX_MEMORY", _int,
        _at_least_one, "MB the approximate prefix-cache index may use over all replicas", "MB",
    ),
    Option(
        "kv_events", "--kv-events", "FLEET_KV_EVENTS", _words, _kv_events,
        "subscribe to the replicas' vLLM KV events (--kv-events-config publisher zmq): auto "
        "(ask each replica's GET /kv_event_sources), PORT on each replica's host, or "
        "REPLICA_URL=tcp://HOST:PORT for one replica (repeatable; env: comma-separated)",
        "SPEC", repeatable=True,
    ),
    Option(
        "peers", "--peer", "FLEET_PEERS", _words, _backends,
        "another router in front of the same replicas, e.g. http://10.0.0.7:8000: each tells "
        "the others which prompt prefixes it sent where (repeatable; env: comma-separated)",
        "URL", repeatable=True,
    ),
    Option(
        "discover_peers_dns", "--discover-peers-dns", "FLEET_DISCOVER_PEERS_DNS", _dns,
        _dns_port,
        "DNS name whose addresses are the other routers (a headless service over the router "
        "pods; this router finds itself among them), with their port", "NAME:PORT",
    ),
    Option(
        "stream_continuation", "--stream-continuation", "FLEET_STREAM_CONTINUATION", _on_off,
        _no_check,
        "when a replica dies mid-stream, continue the stream on another replica (on|off); "
        "requests that cannot be continued exactly still end with an SSE error", "on|off",
    ),
    Option(
        "workers", "--workers", "FLEET_WORKERS", _workers, _worker_count,
        "router processes serving the port, sharing in-flight counts, health and learned "
        "speeds; auto = the cores this process may use", "N|auto",
    ),
    Option(
        "log_level", "--log-level", "FLEET_LOG_LEVEL", _text, _one_of(LOG_LEVELS),
        "log level: " + ", ".join(LOG_LEVELS), "LEVEL",
    ),
    Option(
        "log_format", "--log-format", "FLEET_LOG_FORMAT", _text, _one_of(LOG_FORMATS),
        "log line format: " + ", ".join(LOG_FORMATS), "FORMAT",
    ),
)  # fmt: skip

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RouterConfig)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option; values stay raw strings (None when absent) for config_from_args."""
    for opt in OPTIONS:
        default = _DEFAULTS[opt.field]
        shown = ",".join(default) if isinstance(default, tuple) else default
        help_text = opt.help + (f" (default: {shown})" if shown not in (None, "", ()) else "")
        help_text += f" [env {opt.env}]"
        parser.add_argument(
            opt.flag,
            dest=opt.field,
            action="append" if opt.repeatable else "store",
            default=None,
            metavar=opt.metavar or None,
            help=help_text.replace("%", "%%"),
        )


def _parse(opt: Option, raw: str | list[str], source: str) -> Any:
    try:
        if opt.repeatable:
            items = raw if isinstance(raw, list) else [raw]
            value: Any = tuple(v for item in items for v in opt.parse(item))
        else:
            assert isinstance(raw, str)
            value = opt.parse(raw)
        opt.check(value)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return value


def config_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> RouterConfig:
    """Flags first, then FLEET_* variables, then defaults; errors name the flag or variable."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw_flag = getattr(args, opt.field, None)
        if raw_flag is not None:
            values[opt.field] = _parse(opt, raw_flag, opt.flag)
        elif env.get(opt.env, "").strip():
            values[opt.field] = _parse(opt, env[opt.env], opt.env)
    return RouterConfig(**values)
