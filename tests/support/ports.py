"""Free TCP ports on 127.0.0.1 for servers a test starts (ones that cannot bind port 0)."""

from __future__ import annotations

import random
import socket

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
    return free_port_run(1)


def free_port_run(count: int, attempts: int = 100) -> int:
    """First of `count` consecutive free ports (the launcher numbers replicas from a base)."""
    low, high = TEST_PORTS
    for _ in range(attempts):
        base = _rng.randint(low, high - count + 1)
        if all(port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports in {TEST_PORTS} after {attempts} tries")
