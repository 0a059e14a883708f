"""What the batch knows about the endpoint: our router, a vLLM server, or another server.

Why: ``--max-inflight auto`` starts from the fleet's capacity and adapts to the engines'
queues. Our router shows each replica's learned batch limit and queue in ``GET
/fleet/replicas``; a single vLLM server shows its queue in ``/metrics``; any other
OpenAI-compatible server shows neither, and the limit then learns from latency alone.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from vllm_fleet.launcher.batch.limit import QueueSignal

#: Probes are quick GETs: a server that takes longer is treated as not having the endpoint.
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class FleetView:
    """One look at the endpoint. ``kind`` is "router", "vllm" or "other"."""

    kind: str
    #: Per healthy replica, its batch limit when known.
    capacities: tuple[float | None, ...] = ()
    queue: QueueSignal | None = None


def _router_view(rows: Any) -> FleetView | None:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return None
    healthy = [r for r in rows if r.get("healthy")]
    capacities: list[float | None] = []
    waiting = seen = sent = 0.0
    for row in healthy:
        speed = row.get("speed") or {}
        limit = speed.get("batch_limit")
        capacities.append(float(limit) if isinstance(limit, int | float) and limit > 0 else None)
        waiting += _number(row, "batch_held")  # held back by the router: queued all the same
        waiting += _number(row, "waiting")
        seen += _number(row, "running") + _number(row, "waiting")  # scraped: up to ~1 s old
        sent += _number(row, "in_flight")  # the router's own count: now
    return FleetView("router", tuple(capacities), QueueSignal(waiting, len(healthy), seen, sent))


def _number(row: dict[str, Any], key: str) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, int | float) else 0.0


def waiting_from_metrics(text: str, name: str = "vllm:num_requests_waiting") -> float | None:
    """Sum of a gauge's samples (by default ``vllm:num_requests_waiting``) in a Prometheus
    text page, None without."""
    total: float | None = None
    for line in text.splitlines():
        if line.split("{", 1)[0].split(" ", 1)[0] == name:
            try:
                value = float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            total = (total or 0.0) + value
    return total


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes] | None:
    try:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        async with session.get(url, timeout=timeout) as response:
            return response.status, await response.read()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def look(session: aiohttp.ClientSession, base: str, kind: str | None = None) -> FleetView:
    """Ask the endpoint what it is (``kind`` None) or, knowing it, how its queue stands."""
    if kind in (None, "router"):
        got = await _get(session, f"{base}/fleet/replicas")
        if got is not None and got[0] == 200:
            try:
                view = _router_view(json.loads(got[1]))
            except ValueError:
                view = None
            if view is not None:
                return view
    if kind in (None, "vllm"):
        got = await _get(session, f"{base}/metrics")
        if got is not None and got[0] == 200:
            page = got[1].decode("utf-8", "replace")
            waiting = waiting_from_metrics(page)
            if waiting is not None:
                running = waiting_from_metrics(page, "vllm:num_requests_running") or 0.0
                # ``sent`` is the caller's: only it knows what it has out to this server
                return FleetView("vllm", (None,), QueueSignal(waiting, 1, running + waiting))
    return FleetView("other")
