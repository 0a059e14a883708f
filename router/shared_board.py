"""The state router workers share (``--workers N``): one memory-mapped file, fixed layout.

Layout (every field 8 bytes, so one store is one aligned 8-byte write, which x86-64 and ARM64
never tear)::

    header   magic, slot count, worker count, slots ever used
    workers  per worker: pid, restarts
    slots    per replica slot: NUMBERS doubles, then the URL, model ids and last check error
    cells    per worker, per slot: in flight, served, ejections, prompt tokens sent (int64)

Two kinds of writer, never two writers of one field:

- the supervisor (vllm_fleet.router.workers) runs discovery, health checks and scrapes once for
  the fleet and publishes each replica's slot. A slot is written under a sequence lock (SEQ odd
  while writing), so a worker reading it either gets one whole publication or retries later;
- each worker owns one row of cells and adds to its own cell only. A count is the sum of a
  slot's cells over the workers, read without a lock: a reader may see a worker's count one
  request old, never a torn one. No round trip and no lock per request.

A slot is reused for another replica only once every worker's in-flight cell for it is zero
(a worker may still be finishing requests on a replica discovery removed); ``SERVED_BASE``
and ``EJECTIONS_BASE`` hold what the previous replica's cells summed to, so counts start at
zero.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vllm_fleet.router.prefix_index import BLOCK_BYTES, BYTES_PER_TOKEN, ReplicaPrefixes
from vllm_fleet.router.state import Breaker, ReplicaState

MAGIC = int.from_bytes(b"VFLEETB1", "little")
#: Replicas the board can hold; discovery beyond this is served by the supervisor's log only.
MAX_SLOTS = 256
URL_BYTES = 256
MODELS_BYTES = 2048
ERROR_BYTES = 256
HEADER_WORDS = 8
WORKER_WORDS = 4

# Numeric fields of a slot (doubles); None is stored as NaN.
(
    SEQ, GEN, SERVED_BASE, CHECKS, CHECK_OK, CHECK_REFUSED, HEALTHY, BREAKER, EJECTIONS_BASE,
    SCRAPED_AT, RUNNING, WAITING, KV, IN_FLIGHT_AT_SCRAPE, GEN_TOKENS, TOKEN_S,
    BATCH_SLOWDOWN, BATCH_LIMIT, PEAK_RUNNING, PREFILL_S, OBSERVATIONS, RECENT_TOKENS,
    RECENT_FINISHED, PREFIX_CAPACITY, PREFIX_BLOCK_TOKENS, PREFIX_HITS, PREFIX_QUERIES, PREFIX_AT,
) = range(28)  # fmt: skip
NUMBERS = 28
SLOT_BYTES = NUMBERS * 8 + URL_BYTES + MODELS_BYTES + ERROR_BYTES
BREAKERS = (Breaker.CLOSED, Breaker.OPEN, Breaker.HALF_OPEN)
#: The per-worker cells of a slot: requests in flight, requests served, breaker ejections,
#: prompt tokens sent (the prefill backlog's counter, ReplicaState.prompt_sent).
IN_FLIGHT, SERVED, EJECTIONS, PROMPT_SENT = 0, 1, 2, 3
CELLS = 4


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _whole_ids(models: frozenset[str], limit: int) -> bytes:
    """The model ids one per line, as many whole ones as fit in ``limit`` bytes: a cut id would
    route requests to a model nobody serves."""
    listed = "\n".join(sorted(models)).encode()
    if len(listed) <= limit:
        return listed
    return listed[: max(0, listed.rfind(b"\n", 0, limit + 1))]


@dataclass(frozen=True)
class SlotView:
    """One replica's publication, as a worker read it (a consistent snapshot)."""

    seq: float
    gen: float
    url: str
    models: frozenset[str]
    check_error: str
    numbers: tuple[float, ...]

    def number(self, field: int) -> float:
        return self.numbers[field]


def board_dir() -> str:
    """/dev/shm (memory, never written back to disk) where it exists, else the temp dir."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


class Board:
    """The mapped file; ``create`` in the supervisor, ``attach`` in a worker."""

    def __init__(self, path: str, *, owner: bool) -> None:
        self.path = path
        self._owner = owner
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        self._q = memoryview(self._map).cast("q")
        self._d = memoryview(self._map).cast("d")
        self.slots = self._q[1]
        self.workers = self._q[2]
        self._slot0 = HEADER_WORDS + self.workers * WORKER_WORDS
        self._cells0 = self._slot0 + self.slots * SLOT_BYTES // 8
        if len(self._q) != self._cells0 + self.workers * self.slots * CELLS:
            raise ValueError(f"{path} does not have a router board's size")

    @classmethod
    def create(cls, workers: int, slots: int = MAX_SLOTS) -> Board:
        size = (
            8 * (HEADER_WORDS + workers * WORKER_WORDS + workers * slots * CELLS)
            + slots * SLOT_BYTES
        )
        fd, path = tempfile.mkstemp(prefix="vllm-fleet-router-", suffix=".board", dir=board_dir())
        try:
            os.ftruncate(fd, size)
            os.pwrite(fd, MAGIC.to_bytes(8, "little"), 0)
            os.pwrite(fd, slots.to_bytes(8, "little") + workers.to_bytes(8, "little"), 8)
        finally:
            os.close(fd)
        return cls(path, owner=True)

    @classmethod
    def attach(cls, path: str) -> Board:
        board = cls(path, owner=False)
        if board._q[0] != MAGIC:
            board.close()
            raise ValueError(f"{path} is not a router board")
        return board

    def close(self) -> None:
        self._q.release()
        self._d.release()
        self._map.close()
        if self._owner:
            with contextlib.suppress(FileNotFoundError):
                Path(self.path).unlink()

    # -- workers ---------------------------------------------------------------------------

    def set_worker(self, index: int, pid: int, restarts: int) -> None:
        base = HEADER_WORDS + index * WORKER_WORDS
        self._q[base], self._q[base + 1] = pid, restarts

    def worker(self, index: int) -> tuple[int, int]:
        """(pid, restarts) of worker ``index``."""
        base = HEADER_WORDS + index * WORKER_WORDS
        return self._q[base], self._q[base + 1]

    # -- per-worker cells ------------------------------------------------------------------

    def cell(self, worker: int, slot: int, kind: int) -> int:
        """Index of one worker's count for one slot (for ``add`` and ``value``)."""
        return self._cells0 + (worker * self.slots + slot) * CELLS + kind

    def add(self, cell: int, delta: int) -> None:
        """Add to a cell; only its worker calls this, so read-then-write loses nothing."""
        self._q[cell] += delta

    def value(self, cell: int) -> int:
        return self._q[cell]

    def total(self, slot: int, kind: int) -> int:
        """A slot's count summed over every worker's cell."""
        # The cells are the file's last region: a strided slice from the slot's cell of worker
        # 0 holds exactly one cell per worker (a third of the cost of indexing each).
        return sum(self._q[self._cells0 + slot * CELLS + kind :: self.slots * CELLS])

    def maximum(self, slot: int, kind: int) -> int:
        """A slot's count in the worker whose cell holds the most."""
        return max(self._q[self._cells0 + slot * CELLS + kind :: self.slots * CELLS])

    def clear_worker(self, worker: int) -> None:
        """Zero a dead worker's in-flight cells: its requests died with it."""
        for slot in range(self.slots):
            self._q[self.cell(worker, slot, IN_FLIGHT)] = 0

    # -- slots (written by the supervisor only) ---------------------------------------------

    @property
    def used(self) -> int:
        """Slots below this index have been assigned at least once (readers scan only these)."""
        return self._q[3]

    def _n(self, slot: int) -> int:
        return self._slot0 + slot * SLOT_BYTES // 8

    def gen(self, slot: int) -> float:
        return self._d[self._n(slot) + GEN]

    def seq(self, slot: int) -> float:
        return self._d[self._n(slot) + SEQ]

    def read_number(self, slot: int, field: int) -> float:
        return self._d[self._n(slot) + field]

    def allocate(self, url: str) -> int | None:
        """A free slot for ``url`` (None when the board is full or the URL does not fit).

        A never used slot first, so counts carry over only once the board has seen
        ``slots`` replicas; a used one only when no worker has a request left on it.
        """
        if len(url.encode()) > URL_BYTES - 2:
            return None
        free = [s for s in range(self.slots) if self.gen(s) == 0.0]
        fresh = [s for s in free if s >= self.used]
        idle = [s for s in free if self._idle(s)]
        for slot in fresh[:1] or idle[:1]:
            numbers = {SERVED_BASE: float(self.total(slot, SERVED))}
            numbers[EJECTIONS_BASE] = float(self.maximum(slot, EJECTIONS))
            # GEN is the sequence number this publication ends with: unique per assignment.
            numbers[GEN] = self.seq(slot) + 2
            self.publish(slot, numbers, url=url)
            self._q[3] = max(self._q[3], slot + 1)
            return slot
        return None

    def _idle(self, slot: int) -> bool:
        return all(self.value(self.cell(w, slot, IN_FLIGHT)) == 0 for w in range(self.workers))

    def free(self, slot: int) -> None:
        self.publish(slot, {GEN: 0.0}, url="")

    def publish(
        self,
        slot: int,
        numbers: dict[int, float],
        *,
        url: str | None = None,
        models: frozenset[str] | None = None,
        check_error: str | None = None,
    ) -> None:
        """Write fields of one slot under its sequence lock."""
        n = self._n(slot)
        d = self._d
        d[n + SEQ] += 1.0  # odd: being written
        for field, value in numbers.items():
            d[n + field] = value
        text_at = n * 8 + NUMBERS * 8
        if url is not None:
            self._put(text_at, URL_BYTES, url)
        if models is not None:
            self._put(text_at + URL_BYTES, MODELS_BYTES, _whole_ids(models, MODELS_BYTES - 2))
        if check_error is not None:
            self._put(text_at + URL_BYTES + MODELS_BYTES, ERROR_BYTES, check_error)
        d[n + SEQ] += 1.0  # even: complete

    def _put(self, at: int, size: int, text: str | bytes) -> None:
        data = (text.encode() if isinstance(text, str) else text)[: size - 2]
        self._map[at : at + 2] = len(data).to_bytes(2, "little")
        self._map[at + 2 : at + 2 + len(data)] = data

    def _get(self, at: int, size: int) -> str:
        length = min(int.from_bytes(self._map[at : at + 2], "little"), size - 2)
        return self._map[at + 2 : at + 2 + length].decode(errors="replace")

    def read(self, slot: int) -> SlotView | None:
        """A consistent snapshot of one slot, or None when it is being written right now."""
        n = self._n(slot)
        seq = self._d[n + SEQ]
        if seq % 2:
            return None
        numbers = tuple(self._d[n : n + NUMBERS])
        text_at = n * 8 + NUMBERS * 8
        url = self._get(text_at, URL_BYTES)
        models = self._get(text_at + URL_BYTES, MODELS_BYTES)
        error = self._get(text_at + URL_BYTES + MODELS_BYTES, ERROR_BYTES)
        if self._d[n + SEQ] != seq:
            return None
        return SlotView(
            seq, numbers[GEN], url, frozenset(models.split("\n")) - {""}, error, numbers
        )


def replica_numbers(r: ReplicaState) -> dict[int, float]:
    """What the supervisor publishes of one replica: check outcome, gauges and speeds."""
    s = r.speed
    return {
        CHECKS: float(r.checks_done),
        CHECK_OK: float(r.check_ok),
        CHECK_REFUSED: float(r.check_refused),
        HEALTHY: float(r.healthy),
        BREAKER: float(BREAKERS.index(r.breaker)),
        SCRAPED_AT: r.scraped_at,
        RUNNING: r.running,
        WAITING: r.waiting,
        KV: r.kv_cache_usage,
        IN_FLIGHT_AT_SCRAPE: float(r.in_flight_at_scrape),
        GEN_TOKENS: _nan(r.generation_tokens_total),
        TOKEN_S: _nan(s.token_s),
        BATCH_SLOWDOWN: s.batch_slowdown,
        BATCH_LIMIT: _nan(s.batch_limit),
        PEAK_RUNNING: s.peak_running,
        PREFILL_S: s.prefill_s_per_token,
        OBSERVATIONS: float(s.observations),
        RECENT_TOKENS: s.recent_tokens,
        RECENT_FINISHED: s.recent_finished,
        **prefix_numbers(r.prefixes),
    }


def prefix_numbers(p: ReplicaPrefixes) -> dict[int, float]:
    """The prefix record's size and the replica's prefix-cache counters, as the supervisor's
    scrapes set them (vllm_fleet.router.scrape.apply_prefix_metrics)."""
    hits, queries, at = p.counters or (math.nan, math.nan, math.nan)
    return {
        PREFIX_CAPACITY: float(p.capacity),
        PREFIX_BLOCK_TOKENS: float(p.block_tokens),
        PREFIX_HITS: hits,
        PREFIX_QUERIES: queries,
        PREFIX_AT: at,
    }


def apply_scrape(r: ReplicaState, view: SlotView) -> None:
    """Copy the supervisor's last scrape and learned speed onto a worker's replica record."""
    v = view.number
    r.scraped_at = v(SCRAPED_AT)
    r.running, r.waiting, r.kv_cache_usage = v(RUNNING), v(WAITING), v(KV)
    r.in_flight_at_scrape = int(v(IN_FLIGHT_AT_SCRAPE))
    r.generation_tokens_total = _none(v(GEN_TOKENS))
    s = r.speed
    s.token_s = _none(v(TOKEN_S))
    s.batch_slowdown = v(BATCH_SLOWDOWN)
    s.batch_limit = _none(v(BATCH_LIMIT))
    s.peak_running = v(PEAK_RUNNING)
    s.prefill_s_per_token = v(PREFILL_S)
    s.observations = int(v(OBSERVATIONS))
    s.recent_tokens, s.recent_finished = v(RECENT_TOKENS), v(RECENT_FINISHED)
    r.prefixes.reply_tokens = s.tokens_per_request or 0.0  # as scrape.apply_prefix_metrics
    apply_prefix_numbers(r.prefixes, view)


def apply_prefix_numbers(p: ReplicaPrefixes, view: SlotView) -> None:
    """Size a worker's prefix record as the supervisor sized its own, and fold the replica's
    prefix-cache counters in, so this worker's trust compares the replica's measured hit rate
    with what this worker predicted."""
    v = view.number
    capacity, block_tokens = int(v(PREFIX_CAPACITY)), int(v(PREFIX_BLOCK_TOKENS))
    if capacity > 0 and (capacity, block_tokens) != (p.capacity, p.block_tokens):
        # The cache size that gives exactly ``capacity`` keys under a budget of ``capacity``.
        p.set_capacity((capacity + 1) * BLOCK_BYTES / BYTES_PER_TOKEN, block_tokens, capacity)
    counters = (v(PREFIX_HITS), v(PREFIX_QUERIES), v(PREFIX_AT))
    if not math.isnan(counters[0]) and counters != p.counters:
        p.observe_counters(*counters)


class SharedReplica(ReplicaState):
    """A replica record whose ``in_flight``, ``served`` and ``ejections`` are the whole router's.

    Reading either sums the slot's cells over every worker; writing it (the proxy's
    ``replica.in_flight += 1``) adds the difference to the last read to this worker's own cell.
    ``worker`` None is the supervisor's view: it only reads. Everything else on the record is
    this process's, as with one worker.
    """

    board: Board | None = None
    slot: int = 0
    gen: float = 0.0
    worker: int | None = None
    _seen_in_flight: int = 0
    _seen_served: int = 0
    _seen_ejections: int = 0
    _seen_prompt_sent: int = 0

    def bind(self, board: Board, slot: int, worker: int | None) -> SharedReplica:
        self.board, self.slot, self.gen, self.worker = board, slot, board.gen(slot), worker
        return self

    @property
    def in_flight(self) -> int:
        board = self.board
        if board is None:
            return self._seen_in_flight
        self._seen_in_flight = board.total(self.slot, IN_FLIGHT)
        return self._seen_in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._seen_in_flight = self._write(IN_FLIGHT, value - self._seen_in_flight, value)

    @property
    def served(self) -> int:
        board = self.board
        if board is None:
            return self._seen_served
        base = int(board.read_number(self.slot, SERVED_BASE))
        self._seen_served = board.total(self.slot, SERVED) - base
        return self._seen_served

    @served.setter
    def served(self, value: int) -> None:
        self._seen_served = self._write(SERVED, value - self._seen_served, value)

    @property
    def ejections(self) -> int:
        """The most ejections any worker's breaker made: every worker applies the same failed
        health checks, so a sum would count one failing replica once per worker."""
        board = self.board
        if board is None:
            return self._seen_ejections
        base = int(board.read_number(self.slot, EJECTIONS_BASE))
        return max(0, board.maximum(self.slot, EJECTIONS) - base)

    @ejections.setter
    def ejections(self, value: int) -> None:
        # health.eject does ``r.ejections += 1``: one more for this worker's own breaker.
        delta = value - self.ejections
        self._seen_ejections = value
        board, worker = self.board, self.worker
        if board is not None and worker is not None and delta > 0:
            board.add(board.cell(worker, self.slot, EJECTIONS), delta)

    @property
    def prompt_sent(self) -> int:
        """Prompt tokens every worker sent here (only ever compared with an earlier read)."""
        board = self.board
        if board is None:
            return self._seen_prompt_sent
        self._seen_prompt_sent = board.total(self.slot, PROMPT_SENT)
        return self._seen_prompt_sent

    @prompt_sent.setter
    def prompt_sent(self, value: int) -> None:
        self._seen_prompt_sent = self._write(PROMPT_SENT, value - self._seen_prompt_sent, value)

    def _write(self, kind: int, delta: int, value: int) -> int:
        board, worker = self.board, self.worker
        if board is not None and worker is not None and delta:
            board.add(board.cell(worker, self.slot, kind), delta)
        return value
