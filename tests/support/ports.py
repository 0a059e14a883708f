"""Free TCP ports on 127.0.0.1 for servers a test starts (ones that cannot bind port 0)."""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Iterable

from vllm_fleet.launcher.vllm_args import kv_events_port, kv_replay_port

#: Ports handed out here: below Linux's ephemeral range (32768-60999), so the kernel cannot give
#: a port we picked to an outgoing connection before our server binds it (port 0 picks from that
#: very range; a run failed that way, once).
TEST_PORTS = (20000, 32767)
_rng = random.Random()


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A port that was free a moment ago."""
    return _free_base(1, lambda port: (port,))


def replica_ports(port: int) -> tuple[int, int, int]:
    """The ports a replica serving on ``port`` binds: HTTP, KV events and their replay."""
    events = kv_events_port(port)
    return port, events, kv_replay_port(events)


def free_port_run(count: int) -> int:
    """First of `count` consecutive free ports for replicas (the launcher numbers them from a
    base), each with its KV events and replay ports free and in TEST_PORTS too: a run once lost
    a replica whose replay port, derived above the range, was an outgoing connection's."""
    return _free_base(count, replica_ports)


def _free_base(count: int, ports_of: Callable[[int], Iterable[int]], attempts: int = 100) -> int:
    """A base whose ``count`` consecutive servers find every port ``ports_of`` names free."""
    low, high = TEST_PORTS
    top = max(ports_of(high)) - high  # how far above its own port a server binds
    for _ in range(attempts):
        base = _rng.randint(low, high - top - count + 1)
        if all(port_free(p) for i in range(count) for p in ports_of(base + i)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports in {TEST_PORTS} after {attempts} tries")
