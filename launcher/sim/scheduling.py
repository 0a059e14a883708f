"""vLLM's two scheduling policies, as the simulator's engine applies them.

vLLM V1 (``--scheduling-policy``, vllm/v1/core/sched/scheduler.py and request_queue.py) has:

- ``fcfs`` (the default): the waiting queue in arrival order, a preempted request back at its
  head; when KV blocks run out, the most recently admitted running request is preempted.
- ``priority``: the waiting queue ordered by (``priority``, arrival time), smaller first (the
  request body's ``priority`` field, 0 by default), a preempted request back in its place by
  that order; when KV blocks run out, the running request with the largest (priority, arrival
  time) is preempted, whoever it is. vLLM 0.32 does not preempt for a waiting request that
  finds every ``max_num_seqs`` slot taken: it waits for a slot, first in line.

Kept apart from the engine so its order rules read in one place and can be tested alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, TypeVar

FCFS = "fcfs"
PRIORITY = "priority"
#: Values of ``--scheduling-policy`` (vLLM's names).
POLICIES = (FCFS, PRIORITY)


class Queued(Protocol):
    """What the order rules read of a request."""

    @property
    def priority(self) -> int: ...

    @property
    def arrived_at(self) -> float: ...


Q = TypeVar("Q", bound=Queued)


def order_key(request: Queued) -> tuple[int, float]:
    """vLLM's priority order: lower priority value first, then earlier arrival."""
    return request.priority, request.arrived_at


def next_waiting(waiting: Mapping[str, Q], policy: str) -> Q:
    """The waiting request the scheduler tries to admit next (``waiting`` is non-empty and kept
    in FCFS order: insertion order, preempted requests put back at the front)."""
    if policy == PRIORITY:
        return min(waiting.values(), key=order_key)
    return next(iter(waiting.values()))


def preemption_victim(running: dict[str, Q], policy: str) -> Q:
    """The running request preempted when KV blocks run out (``running`` in admission order)."""
    if policy == PRIORITY:
        return max(running.values(), key=order_key)
    return next(reversed(running.values()))


def check_policy(policy: str) -> str:
    """``policy`` if vLLM knows it, else ValueError naming the choices."""
    if policy not in POLICIES:
        raise ValueError(f"unknown scheduling policy {policy!r}; use one of {', '.join(POLICIES)}")
    return policy


def waiting_order(waiting: Iterable[Q], policy: str) -> list[Q]:
    """The whole queue in the order the scheduler would admit it (for tests and /sim/stats)."""
    items = list(waiting)
    return sorted(items, key=order_key) if policy == PRIORITY else items
