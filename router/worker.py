"""One worker of ``--workers N``: its link to the shared board (vllm_fleet.router.shared_board).

A worker serves requests like the single-process router, with three differences:

- it runs no discovery, health checks nor scrapes. Every SYNC_INTERVAL_S it reads the slots
  the supervisor published: the replica set, each replica's model ids and last check outcome,
  its engine gauges and learned speed. A new check outcome goes through this worker's own
  breaker (vllm_fleet.router.health.apply_check), exactly as its health loop would apply it, so
  failed requests this worker saw still eject a replica from its rotation at once;
- its replica records are SharedReplica: ``in_flight`` and ``served`` are the whole router's
  counts, kept in per-worker cells of shared memory, so the balancer sees every worker's
  requests without a round trip per request;
- /metrics merges every worker's counters and histograms (prometheus-client's multiprocess
  mode, PROMETHEUS_MULTIPROC_DIR set by the supervisor) with the fleet's per-replica gauges,
  and /fleet/workers shows each worker's share.

What stays per worker: the prefix index (each worker knows the prefixes it sent), the
progress monitor (it watches this worker's own attempts) and KV-event subscriptions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from vllm_fleet.router.health import BreakerPolicy, apply_check, begin_check, probe_due
from vllm_fleet.router.shared_board import (
    CHECK_OK,
    CHECK_REFUSED,
    CHECKS,
    IN_FLIGHT,
    SCRAPED_AT,
    SERVED,
    Board,
    SharedReplica,
    SlotView,
    apply_scrape,
)
from vllm_fleet.router.state import Fleet, ReplicaState
from vllm_fleet.router.telemetry import FleetCollector, PrefixCollector

log = logging.getLogger("vllm_fleet.router")

#: How often a worker reads the supervisor's publications. Health and scrape results are
#: one-second data, so 100 ms adds little to their age; each read wakes an idle worker, which
#: costs about 0.1 ms of CPU (measured idle: 8-10 ms/s for two workers at 50 ms).
SYNC_INTERVAL_S = 0.1


#: Where workers of --workers N reach each other as peers (vllm_fleet.router.peers).
SIBLING_HOST = "127.0.0.1"


class WorkerLink:
    """Worker ``index``'s view of the board and its sync step."""

    def __init__(
        self, board: Board, index: int, parent_pid: int, sibling_ports: tuple[int, ...] = ()
    ) -> None:
        self.board = board
        self.index = index
        self.parent_pid = parent_pid
        #: Every worker's loopback port, where its siblings reach it as a peer (index order).
        self.sibling_ports = sibling_ports
        self._views: dict[int, SlotView] = {}
        self._slots: dict[str, int] = {}

    @property
    def sibling_port(self) -> int | None:
        """This worker's own loopback port (None when the workers are not peered)."""
        return self.sibling_ports[self.index] if self.sibling_ports else None

    def new_replica(self, url: str) -> ReplicaState:
        """The Fleet's factory: a record counted in this worker's cells of the URL's slot."""
        replica = SharedReplica(url=url)
        slot = self._slots.get(url)
        return replica if slot is None else replica.bind(self.board, slot, self.index)

    def read(self) -> None:
        """Take the slots that changed since the last read (a slot being written is retried
        at the next one)."""
        board = self.board
        for slot in range(board.used):
            known = self._views.get(slot)
            if known is not None and known.seq == board.seq(slot):
                continue
            view = board.read(slot)
            if view is not None:
                self._views[slot] = view
        self._slots = {v.url: s for s, v in self._views.items() if v.gen and v.url}

    def sync(self, fleet: Fleet, breaker: BreakerPolicy) -> None:
        """Make ``fleet`` what the supervisor published, through this worker's breaker."""
        self.read()
        for url, r in list(fleet.replicas.items()):
            slot = self._slots.get(url)
            moved = isinstance(r, SharedReplica) and (
                slot is None or r.board is None or r.slot != slot or r.gen != self._views[slot].gen
            )
            if moved and slot is not None:
                del fleet.replicas[url]  # re-published in another slot: counted there now
        fleet.set_backends(self._slots)
        now = time.monotonic()
        for url, slot in self._slots.items():
            apply_view(fleet.replicas[url], self._views[slot], now, breaker)

    async def sync_loop(self, fleet: Fleet, breaker: BreakerPolicy) -> None:
        """Sync forever; a worker whose supervisor is gone shuts itself down gracefully."""
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            if os.getppid() != self.parent_pid:
                log.error("router supervisor is gone, worker %d stopping", self.index)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            self.sync(fleet, breaker)

    def rows(self) -> list[dict[str, Any]]:
        """Each worker's pid, restarts and share of the counts (for /fleet/workers)."""
        board = self.board
        rows: list[dict[str, Any]] = []
        for w in range(board.workers):
            pid, restarts = board.worker(w)
            slots = range(board.used)
            rows.append(
                {
                    "worker": w,
                    "pid": pid,
                    "restarts": restarts,
                    "in_flight": sum(board.value(board.cell(w, s, IN_FLIGHT)) for s in slots),
                    "served": sum(board.value(board.cell(w, s, SERVED)) for s in slots),
                }
            )
        return rows


def apply_view(r: ReplicaState, view: SlotView, now: float, breaker: BreakerPolicy) -> None:
    """Apply one slot to a worker's record: a new check outcome, a new scrape."""
    checks = int(view.number(CHECKS))
    if checks != r.checks_done:
        r.checks_done = checks
        r.models = view.models
        if probe_due(r, now):
            begin_check(r, now)
            refused = bool(view.number(CHECK_REFUSED))
            apply_check(r, bool(view.number(CHECK_OK)), now, breaker, refused=refused)
        r.check_error = view.check_error
        r.check_refused = bool(view.number(CHECK_REFUSED))
    if view.number(SCRAPED_AT) != r.scraped_at:
        apply_scrape(r, view)


def merged_registry(fleet: Fleet) -> CollectorRegistry:
    """Every worker's counters and histograms summed (multiprocess mode), plus the fleet's
    per-replica gauges, whose in-flight and served counts are already the whole router's."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(FleetCollector(fleet))
    registry.register(PrefixCollector(fleet))
    return registry


WORKER: web.AppKey[WorkerLink] = web.AppKey("worker", WorkerLink)


async def fleet_workers(request: web.Request) -> web.Response:
    """GET /fleet/workers: which worker answered, and every worker's pid and counts."""
    link = request.app[WORKER]
    return web.json_response({"answered_by": link.index, "workers": link.rows()})
