"""What the router knows about each replica, as plain mutable records.

Background loops (discovery, health checks, metrics scraping) write these records; the proxy
reads a snapshot of them and hands it to the balancer. Nothing here does I/O, so the whole
decision path can be tested with hand-built states.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from vllm_fleet.router.prefix_index import ReplicaPrefixes
from vllm_fleet.router.speed import SpeedEstimate


class Breaker(enum.Enum):
    """Circuit-breaker position of one replica.

    CLOSED: traffic flows. OPEN: ejected, no traffic until a probe succeeds after a cool-down.
    HALF_OPEN: one probe allowed; its outcome closes or re-opens the breaker.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: Panic mode's last resort: a replica that sent bytes this recently is reachable, whatever its
#: health check says (see Fleet.panic_candidates).
PANIC_RECENT_S = 3.0


@dataclass(eq=False, slots=True)
class Attempt:
    """One request sent to a replica and still waiting for its first byte.

    ``abandon`` cancels the attempt (the proxy then re-sends the request elsewhere: nothing has
    reached the client yet). The progress monitor calls it when the replica is found hung.
    """

    sent_at: float
    #: When the first byte is overdue: the router's own estimate of the request's time there
    #: (router.progress.first_byte_due), generously padded.
    due_at: float
    abandon: Callable[[], object]
    abandoned: bool = False


@dataclass(eq=False, slots=True)
class Outcomes:
    """Recent request outcomes of one replica, exponentially forgotten (vllm_fleet.router.outliers).

    Only answers count here: a 5xx the replica sent (``errors``) or a success. Gateway failures
    (refused, reset, timeouts) go to the breaker's consecutive count instead.
    """

    requests: float = 0.0
    errors: float = 0.0
    at: float = 0.0


@dataclass
class ReplicaState:
    """One upstream vLLM server as the router sees it."""

    url: str
    #: Admitted by the health checker and the breaker; the balancer only sees healthy replicas.
    healthy: bool = False
    breaker: Breaker = Breaker.CLOSED
    consecutive_failures: int = 0
    #: monotonic time of the last counted failure (old failures do not make a streak).
    last_failure_at: float = 0.0
    #: monotonic time the breaker opened (for the cool-down before the half-open probe).
    opened_at: float = 0.0
    ejections: int = 0
    #: Requests this router has sent and not yet finished: known instantly, unlike scraped gauges.
    in_flight: int = 0
    #: Engine gauges from the last /metrics scrape (vllm:num_requests_*, vllm:kv_cache_usage_perc).
    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float = 0.0
    #: monotonic time of the last successful scrape; 0 when never scraped.
    scraped_at: float = 0.0
    #: ``in_flight`` when that scrape was taken: the engine's counts include these requests,
    #: so the balancer subtracts them to see only other clients' load.
    in_flight_at_scrape: int = 0
    #: Model ids from GET /v1/models (served names and aliases).
    models: frozenset[str] = frozenset()
    #: LoRA adapter id -> its base model (vLLM's ``parent`` in /v1/models).
    parents: dict[str, str] = field(default_factory=dict)
    #: Total requests the router finished on this replica (for /fleet/replicas and tests).
    served: int = 0
    #: Prompt tokens the cost policy predicted this replica would compute, summed over every
    #: request sent to it (with --workers N, over every worker's): the prefill backlog
    #: follows its growth (vllm_fleet.router.prefill_backlog).
    prompt_sent: int = 0
    #: What the other routers (vllm_fleet.router.peers) last said they have in flight here, when
    #: that was (monotonic; counts older than peers.LOAD_TTL_S are not counted), and how many
    #: of them the last scrape's gauges already held; and the prompt tokens they sent here
    #: since this router first heard from them, and when that last grew (the prefill backlog
    #: follows it too, from when it was heard of, not from this router's next pick).
    peer_in_flight: int = 0
    peer_counts_at: float = 0.0
    peer_in_flight_at_scrape: int = 0
    peer_prompt_sent: int = 0
    peer_prompt_at: float = 0.0
    #: Outcome of the last active health check (GET /health). ``healthy`` is kept equal to
    #: ``breaker is CLOSED and check_ok`` by vllm_fleet.router.health.
    check_ok: bool = False
    #: True once the replica has passed a health check: failures before that mean "still
    #: starting" (loading weights can take minutes) and do not trip the breaker.
    ever_healthy: bool = False
    #: monotonic time the model list was last fetched (it is refreshed every
    #: vllm_fleet.router.health.MODELS_REFRESH_S) and the last active check started.
    models_at: float = 0.0
    checked_at: float = 0.0
    #: Consecutive re-openings without a stable CLOSED period; doubles the cool-down.
    open_streak: int = 0
    #: Cool-down (seconds) that applies to the current OPEN period.
    cooldown_s: float = 0.0
    #: monotonic time the breaker last closed (to tell a flapping replica from a stable one).
    closed_at: float = 0.0
    #: Why the last active check failed; empty when it passed (logged on change only).
    check_error: str = ""
    #: Active checks applied so far, and whether the last one failed on a refused connection:
    #: with --workers N the supervisor publishes these and each worker applies the outcome.
    checks_done: int = 0
    check_refused: bool = False
    #: Engine counter vllm:generation_tokens_total from the last scrape (None when not exported).
    generation_tokens_total: float | None = None
    #: Why the last /metrics scrape failed; empty when it succeeded (logged on change only).
    scrape_error: str = ""
    #: Decode speed, batch slowdown, batch limit and request sizes learned from the engine's
    #: counters at every scrape (vllm_fleet.router.speed); the cost policy reads it.
    speed: SpeedEstimate = field(default_factory=SpeedEstimate)
    #: Prompt prefixes this router sent here and believes cached (vllm_fleet.router.prefix_index);
    #: the cost policy reads it, the proxy records into it, scrapes and KV events correct it.
    prefixes: ReplicaPrefixes = field(default_factory=ReplicaPrefixes)
    #: Attempts waiting for their first byte (vllm_fleet.router.upstream.send_once adds and removes
    #: them).
    awaiting: set[Attempt] = field(default_factory=set)
    #: Streams being relayed from this replica right now; ``abandon`` cuts one (its relay then
    #: sees the replica fail mid-stream, and continues or ends it: vllm_fleet.router.relay).
    relays: set[Attempt] = field(default_factory=set)
    #: monotonic time any byte last came from this replica (answer headers, a body, a chunk).
    last_byte_at: float = 0.0
    #: Set by the progress monitor: requests here are overdue and the replica says nothing.
    #: Suspects get no new request while another candidate is fine (vllm_fleet.router.progress).
    suspect: bool = False
    #: monotonic time the replica became a suspect (0 when it is not one).
    suspect_since: float = 0.0
    #: Answers by status class, for the 5xx-rate outlier detection (vllm_fleet.router.outliers).
    outcomes: Outcomes = field(default_factory=Outcomes)

    @property
    def streams(self) -> int:
        """Streams being relayed from this replica right now."""
        return len(self.relays)


@dataclass
class Fleet:
    """The set of replicas the router currently knows, keyed by base URL."""

    replicas: dict[str, ReplicaState] = field(default_factory=dict)
    #: Builds the record of a new replica; with --workers N one whose counts are shared
    #: (vllm_fleet.router.shared_board.SharedReplica).
    new_replica: Callable[[str], ReplicaState] = field(
        default=lambda url: ReplicaState(url=url), repr=False, compare=False
    )

    def set_backends(self, urls: Iterable[str]) -> tuple[list[str], list[str]]:
        """Make the known set equal to ``urls``; keep state of replicas that stay.

        Returns (added, removed) so the caller can log the change.
        """
        wanted = list(dict.fromkeys(u.rstrip("/") for u in urls))
        added = [u for u in wanted if u not in self.replicas]
        removed = [u for u in self.replicas if u not in wanted]
        for url in removed:
            del self.replicas[url]
        for url in added:
            self.replicas[url] = self.new_replica(url)
        return added, removed

    def healthy(self) -> list[ReplicaState]:
        return [r for r in self.replicas.values() if r.healthy]

    def candidates(self, model: str | None, exclude: Collection[str] = ()) -> list[ReplicaState]:
        """Healthy replicas that serve ``model`` (any model when None), minus ``exclude``."""
        found = [
            r
            for r in self.replicas.values()
            if r.healthy and r.url not in exclude and (model is None or model in r.models)
        ]
        if len(found) > 1 and any(r.suspect for r in found):
            fine = [r for r in found if not r.suspect]
            if fine:  # a suspect gets nothing new while another candidate is fine
                return fine
        return found

    def panic_candidates(
        self, model: str | None, exclude: Iterable[str] = (), now: float = 0.0
    ) -> list[ReplicaState]:
        """The least-bad replicas when no healthy one is left (panic mode, as Envoy and nginx).

        First choice: replicas the breaker ejected for failed requests but whose /health still
        answers; a replica that answers most requests beats a 503 for all of them. When no
        check passes anywhere (every check timing out at once says more about the router's
        host or network than about the replicas), the replicas that were not ejected and sent
        bytes within PANIC_RECENT_S of ``now`` are reachable and are used. Replicas suspected
        of hanging (vllm_fleet.router.progress), ejected ones whose check fails (a hung replica is
        ejected so) and ones that refused a connection stay out.
        """
        skip = set(exclude)
        serving = [
            r
            for r in self.replicas.values()
            if not r.suspect and r.url not in skip and (model is None or model in r.models)
        ]
        passing = [r for r in serving if r.check_ok]
        if passing or now <= 0.0:
            return passing
        return [
            r
            for r in serving
            if r.breaker is Breaker.CLOSED
            and r.last_byte_at > 0.0
            and now - r.last_byte_at < PANIC_RECENT_S
            and not r.check_error.startswith("connect")
        ]

    def ejected_count(self) -> int:
        """Replicas the circuit breaker holds out of rotation (OPEN or HALF_OPEN)."""
        return sum(1 for r in self.replicas.values() if r.breaker is not Breaker.CLOSED)

    def model_parents(self) -> dict[str, str]:
        """Adapter -> base model over healthy replicas (what /v1/models reports as parent)."""
        return {a: p for r in self.healthy() for a, p in r.parents.items() if a in r.models}

    def served_models(self) -> list[str]:
        """Union of model ids over healthy replicas, sorted for stable output."""
        return sorted({m for r in self.healthy() for m in r.models})
