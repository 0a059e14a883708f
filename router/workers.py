"""``vllm-fleet router --workers N``: a supervisor and N router processes on one port.

One Python process relays on one core; a fleet streaming tens of thousands of chunks a second
needs several. The supervisor (this module, the process the user started):

- reserves the port: it binds a socket with SO_REUSEPORT and never listens on it, so a taken
  port is the usual one-line error before any worker starts, ``--port 0`` gets one port for
  all workers, and no other program can take the port while a worker restarts;
- starts N workers (multiprocessing "spawn": fresh interpreters, nothing inherited from a
  running event loop) that each listen on the port with SO_REUSEPORT. The kernel then hashes
  every new connection to one worker's accept queue: connections spread evenly and no worker
  is woken for a connection another takes. One inherited socket that all workers accept from
  balances worse on Linux: epoll wakes the workers in LIFO order, so the busiest-but-waiting
  worker takes most connections (the reason nginx added ``reuseport``);
- runs discovery, health checks and metric scrapes once for the fleet (not once per worker:
  N workers would multiply /health and /metrics traffic on every replica by N) and publishes
  the results in shared memory (vllm_fleet.router.shared_board) every PUBLISH_INTERVAL_S;
- restarts a worker that dies (after RESTART_BACKOFF_S, doubling while it keeps dying young),
  clearing its in-flight counts: its requests died with it;
- on SIGTERM or SIGINT sends each worker SIGTERM: each stops listening and drains its requests
  for --shutdown-grace seconds as the single-process router does; a worker still alive
  STOP_MARGIN_S after that is killed. Workers ignore SIGINT (a terminal's Ctrl-C reaches the
  whole process group; the supervisor's SIGTERM is the one stop signal) and treat a second
  SIGTERM as the first, so a group-wide SIGTERM drains once. A worker whose supervisor
  disappears stops by itself.

Workers share per-replica in-flight and served counts (per-worker cells, summed on read), the
check outcomes, engine gauges and learned speeds; /fleet/replicas answers the same from every
worker and /metrics merges every worker's counters (prometheus-client multiprocess mode,
PROMETHEUS_MULTIPROC_DIR in a temporary directory the supervisor removes at exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.process import BaseProcess

from prometheus_client import multiprocess

from vllm_fleet.router.app import discovery_sources, make_app, upstream_client, watch_fleet
from vllm_fleet.router.config import RouterConfig
from vllm_fleet.router.discovery import Discovery, refresh_once
from vllm_fleet.router.errors import ConfigError
from vllm_fleet.router.health import BreakerPolicy
from vllm_fleet.router.logs import configure_logging
from vllm_fleet.router.serve import new_event_loop, run_worker
from vllm_fleet.router.shared_board import (
    URL_BYTES,
    Board,
    SharedReplica,
    board_dir,
    replica_numbers,
)
from vllm_fleet.router.state import Fleet, ReplicaState
from vllm_fleet.router.upstream_client import UpstreamClient
from vllm_fleet.router.worker import SIBLING_HOST, SYNC_INTERVAL_S, WorkerLink

log = logging.getLogger("vllm_fleet.router")

PUBLISH_INTERVAL_S = SYNC_INTERVAL_S
#: How often the supervisor looks for dead workers.
POLL_S = 0.5
#: First wait before restarting a dead worker; doubles (up to RESTART_BACKOFF_MAX_S) while
#: workers die within YOUNG_S of starting, so a worker that cannot start is no busy loop.
RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0
YOUNG_S = 10.0
#: Seconds past --shutdown-grace a worker may take to exit before it is killed.
STOP_MARGIN_S = 5.0


def reserve_port(config: RouterConfig) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket on the router's address."""
    try:
        info = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(info[4])
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        if isinstance(exc, socket.gaierror) or exc.errno in (
            errno.EADDRINUSE,
            errno.EADDRNOTAVAIL,
            errno.EACCES,
        ):
            raise ConfigError(
                f"--port/--host: cannot listen on {config.host}:{config.port} "
                f"({exc.strerror}); choose a free port or another address"
            ) from None
        raise
    return sock


def reserve_sibling_ports(count: int) -> list[socket.socket]:
    """One bound, never listening SO_REUSEPORT socket per worker on a free loopback port: the
    worker listens there beside it (as on the router's port), and a restarted worker finds
    its port still free."""
    reserved: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((SIBLING_HOST, 0))
        reserved.append(sock)
    return reserved


def worker_main(
    config: RouterConfig,
    index: int,
    board_path: str,
    parent_pid: int,
    sibling_ports: tuple[int, ...] = (),
) -> None:
    """A worker process: the router app, linked to the board, served with SO_REUSEPORT, and
    peered with its siblings on ``sibling_ports`` (vllm_fleet.router.app.peer_link)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(config.log_level, config.log_format)
    board = Board.attach(board_path)
    link = WorkerLink(board, index, parent_pid, sibling_ports)
    try:
        run_worker(make_app(config, link), config, index, link.sibling_port)
    finally:
        board.close()


class Publisher:
    """The supervisor's side of the board: one slot per replica its fleet knows."""

    def __init__(self, board: Board) -> None:
        self.board = board
        self._slots: dict[str, int] = {}
        self._published: dict[str, tuple[object, ...]] = {}

    def new_replica(self, url: str) -> ReplicaState:
        slot = self.board.allocate(url)
        if slot is None:
            log.warning(
                "replica not shared with the workers (board full at %d replicas, or URL over "
                "%d bytes): %s", self.board.slots, URL_BYTES - 2, url,
            )  # fmt: skip
            return ReplicaState(url=url)
        self._slots[url] = slot
        return SharedReplica(url=url).bind(self.board, slot, None)

    def publish(self, fleet: Fleet) -> None:
        for url, slot in list(self._slots.items()):
            r = fleet.replicas.get(url)
            if not (isinstance(r, SharedReplica) and r.slot == slot):
                self.board.free(slot)
                del self._slots[url]
                self._published.pop(url, None)
        for url, slot in self._slots.items():
            r = fleet.replicas[url]
            mark = (r.checks_done, r.scraped_at, r.models, r.healthy, r.breaker, r.ejections)
            if mark != self._published.get(url):
                numbers = replica_numbers(r)
                self.board.publish(slot, numbers, models=r.models, check_error=r.check_error)
                self._published[url] = mark

    async def loop(self, fleet: Fleet) -> None:
        while True:
            self.publish(fleet)
            await asyncio.sleep(PUBLISH_INTERVAL_S)


@dataclasses.dataclass
class WorkerSlot:
    """One worker position: its current process and restart history."""

    index: int
    process: BaseProcess | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = RESTART_BACKOFF_S
    restart_at: float = 0.0


class Supervisor:
    def __init__(
        self, config: RouterConfig, board: Board, sibling_ports: tuple[int, ...] = ()
    ) -> None:
        self.config = config
        self.board = board
        self.sibling_ports = sibling_ports
        self.workers = [WorkerSlot(i) for i in range(config.workers)]
        self._spawn = multiprocessing.get_context("spawn")

    def start(self, w: WorkerSlot) -> None:
        args = (self.config, w.index, self.board.path, os.getpid(), self.sibling_ports)
        process = self._spawn.Process(target=worker_main, args=args, name=f"router-{w.index}")
        process.start()
        assert process.pid is not None
        w.process, w.started_at = process, time.monotonic()
        self.board.set_worker(w.index, process.pid, w.restarts)
        log.info("router worker started worker=%d pid=%d", w.index, process.pid)

    def check(self, now: float) -> None:
        """Notice dead workers and restart them when their back-off has passed."""
        for w in self.workers:
            p = w.process
            if p is not None and p.exitcode is not None:
                young = now - w.started_at < YOUNG_S
                delay = w.backoff_s if young else RESTART_BACKOFF_S
                w.backoff_s = min(delay * 2, RESTART_BACKOFF_MAX_S)
                w.restart_at = now + delay
                log.warning(
                    "router worker died worker=%d pid=%s exit=%s restart_in_s=%.1f",
                    w.index, p.pid, p.exitcode, w.restart_at - now,
                )  # fmt: skip
                self.board.clear_worker(w.index)
                if p.pid is not None:
                    multiprocess.mark_process_dead(p.pid)  # type: ignore[no-untyped-call]
                p.close()
                w.process = None
            if w.process is None and now >= w.restart_at:
                w.restarts += 1
                self.start(w)

    async def stop(self) -> None:
        """SIGTERM every worker, wait for their drain, kill what is left."""
        alive = [w.process for w in self.workers if w.process is not None]
        for p in alive:
            if p.pid is not None and p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace_s + STOP_MARGIN_S
        while any(p.exitcode is None for p in alive) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in alive:
            if p.exitcode is None:
                log.warning("router worker did not stop, killed pid=%s", p.pid)
                p.kill()
            p.join(5.0)


async def _supervise(
    config: RouterConfig, board: Board, sibling_ports: tuple[int, ...] = ()
) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    supervisor = Supervisor(config, board, sibling_ports)
    publisher = Publisher(board)
    fleet = Fleet(new_replica=publisher.new_replica)
    sources = discovery_sources(config)
    breaker = BreakerPolicy(
        failure_threshold=config.failure_threshold,
        cooldown_s=config.breaker_cooldown_s,
        max_ejection_percent=config.max_ejection_percent,
    )
    client = upstream_client(config)
    try:
        tasks = await _watch(fleet, client, sources, config, breaker, publisher)
        for w in supervisor.workers:
            supervisor.start(w)
        log.info("router supervisor workers=%d port=%d", config.workers, config.port)
        try:
            while not stopping.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), POLL_S)
                if not stopping.is_set():
                    supervisor.check(time.monotonic())
            log.info("router stopping workers=%d", config.workers)
            await supervisor.stop()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await client.close()


async def _watch(
    fleet: Fleet,
    client: UpstreamClient,
    sources: list[Discovery],
    config: RouterConfig,
    breaker: BreakerPolicy,
    publisher: Publisher,
) -> list[asyncio.Task[None]]:
    await refresh_once(fleet, sources)
    publisher.publish(fleet)
    tasks = watch_fleet(fleet, client, sources, config, breaker)
    tasks.append(asyncio.create_task(publisher.loop(fleet), name="publish"))
    return tasks


def serve_workers(config: RouterConfig) -> int:
    """Supervise ``config.workers`` router processes until SIGTERM/SIGINT; the exit status."""
    reserved = reserve_port(config)
    config = dataclasses.replace(config, port=reserved.getsockname()[1])
    metrics_dir = tempfile.mkdtemp(prefix="vllm-fleet-metrics-", dir=board_dir())
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by the workers
    board = Board.create(config.workers)
    siblings = reserve_sibling_ports(config.workers)
    ports = tuple(sock.getsockname()[1] for sock in siblings)
    loop = new_event_loop()
    try:
        loop.run_until_complete(_supervise(config, board, ports))
    finally:
        loop.close()
        board.close()
        reserved.close()
        for sock in siblings:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("router stopped")
    return 0
