"""Prefill this router sent to each replica that the replica is probably still computing.

Why: a prompt's first token waits for every prompt the replica was given before it to be
prefilled. vLLM V1 computes at most ``max_num_batched_tokens`` per step (2,048 on CPUs, a few
thousand on GPUs), running requests first, so a replica that was just sent two cold 1,500-token
prompts holds a third one back for a step or two, or leaves it waiting with fewer than
``max_num_seqs`` running. Counting requests does not see this: a replica running two cold
prefills looks exactly as busy as one running two decodes. In scenario 8 (shared prefixes)
21 of the 22 slowest first tokens were sent to a replica that was still prefilling a cold
prompt (bench/findings.md, issue 17 session 24).

The router knows what it sent and what it predicted each replica would compute of it (the
cost policy's computed tokens ``P``), but not when the engine finishes a prefill (a stream's
headers come before it, and the first token is the relay's business). So each replica's
backlog is a fluid queue of prompt tokens: every request adds the tokens it makes the replica
compute, and the backlog drains at the replica's measured prefill speed (its
``vllm:request_prefill_time_seconds`` per computed token, vllm_fleet.router.speed), or at
PREFILL_S_PER_TOKEN_PRIOR until that is measured, as a replica that prefills one prompt after
the other would. Tokens, not seconds, so the cost policy prices the backlog in its own units
(the same ``p`` as the request's own prefill) even before any speed is learned. It needs no
message from the data path and forgets itself: a replica nobody sent anything to for as long
as its backlog takes is back to zero.

The sends come from a counter on the replica's record (``ReplicaState.prompt_sent``: computed
prompt tokens sent, ever) rather than from the policy's own picks, so with ``--workers N``,
where that counter is the sum of every worker's cell in shared memory like the in-flight
count (vllm_fleet.router.shared_board), each worker's backlog holds every worker's prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Weight of a prefill second on a first token's path (the request's own prefill, the backlog
#: ahead of it, and a duplicate prefix that a later request will compute again) against a
#: decode second in the cost policy; the stall a prompt causes the requests already running
#: there is one late token each and is priced at its measured seconds. Why a weight: the
#: cost sums seconds of latency, and moving a conversation off the replica that holds it buys
#: a smaller batch (the whole answer a little faster, for it and the others) with a longer
#: first token (the history computed again). In seconds the two are close (a 1,000-token
#: history against one request less in a batch of 5), so at weight 1 the router moved 1 turn
#: in 20 and those moves were scenario 9's slowest first tokens. A user waits for the first
#: token and reads the rest as it streams, so first-token seconds weigh more. Measured (one
#: run each, sglang-router cache_aware in the same or a neighbouring run; bench/findings.md,
#: issue 17): scenario 9 TTFT p99 138 / 91 / 84 ms at weight 1 / 2 / 4 with the stall priced
#: at the same weight (sglang 74-81), 72-73 ms at 8 with the stall at measured seconds (moved
#: turns 30 -> 8; hit 99 % of the best possible; mean 0.82 s against sglang's 0.84);
#: scenario 8 at 8: hit 100 % of the best, mean 0.520 s, TTFT p99 244 ms (sglang 0.525 s,
#: 283 ms).
PREFILL_WEIGHT = 8.0
#: Seconds per prompt token a replica is assumed to prefill until it says (10,000 tokens/s:
#: the simulator on this 2-core box measured ~7,000, a GPU does tens of thousands; a drain
#: that is too slow only makes the first second of a fresh router spread prompts a bit more).
PREFILL_S_PER_TOKEN_PRIOR = 1e-4
#: Replicas remembered at most (backlogs that drained are dropped first when over it).
MAX_REPLICAS = 4096


def drain_s_per_token(measured: float) -> float:
    """Seconds per token a backlog drains at: the replica's measured prefill speed, or
    PREFILL_S_PER_TOKEN_PRIOR while it has none (0)."""
    return measured if measured > 0.0 else PREFILL_S_PER_TOKEN_PRIOR


@dataclass
class PendingPrefill:
    """One replica's backlog: ``tokens`` left to prefill at monotonic time ``at``, draining at
    one token per ``s_per_token`` seconds."""

    tokens: float = 0.0
    at: float = 0.0
    s_per_token: float = PREFILL_S_PER_TOKEN_PRIOR
    #: The replica's ``prompt_sent`` and ``peer_prompt_sent`` counters when last followed (see
    #: PrefillBacklog.follow).
    seen: int = 0
    seen_peer: int = 0

    def ahead(self, now: float) -> float:
        """Prompt tokens still ahead of a request sent at ``now``."""
        return max(0.0, self.tokens - max(0.0, now - self.at) / self.s_per_token)


@dataclass
class PrefillBacklog:
    """Backlogs by replica URL (one per policy instance, so two apps never share one)."""

    _by_url: dict[str, PendingPrefill] = field(default_factory=dict)

    def ahead(self, url: str, now: float) -> float:
        """Prompt tokens the router believes ``url`` still has to prefill at ``now``."""
        pending = self._by_url.get(url)
        return pending.ahead(now) if pending is not None else 0.0

    def follow(
        self,
        url: str,
        now: float,
        sent: int,
        s_per_token: float,
        *,
        peer_sent: int = 0,
        peer_at: float = 0.0,
    ) -> float:
        """Prompt tokens still ahead at ``now`` on ``url``, whose ``prompt_sent`` counter reads
        ``sent`` and whose other routers' counter (``peer_prompt_sent``) read ``peer_sent``
        when it last grew, at ``peer_at``.

        What ``sent`` grew by beyond this backlog's own sends (``send``) was sent by another
        worker since the last call: it joins the queue now, a little late (when it was sent
        is not recorded), which errs toward a longer backlog. What the peers' counter grew by
        was heard of at ``peer_at`` and has drained since: only what is left of it joins. When
        it joined at the next pick whole, a router that picked seldom took a prompt its peer
        had sent half a second before, long prefilled, for a fresh one, and sent the group's
        next request away from the replica that held it (two peered routers in
        test_two_peered_routers_find_what_one_router_finds). The first call for a URL only
        notes the counters (what was sent before this backlog existed is taken as
        prefilled)."""
        pending = self._by_url.get(url)
        if pending is None:
            pending = self._new(url, now)
            pending.seen, pending.seen_peer = sent, peer_sent
            return 0.0
        grown, peer_grown = sent - pending.seen, peer_sent - pending.seen_peer
        pending.seen, pending.seen_peer = sent, peer_sent
        if peer_grown > 0:
            drained = max(0.0, now - peer_at) / drain_s_per_token(s_per_token)
            grown += max(0, round(peer_grown - drained))
        if grown > 0:
            self.add(url, now, float(grown), s_per_token)
        return pending.ahead(now)

    def send(self, url: str, now: float, tokens: int, s_per_token: float) -> None:
        """This policy sent ``url`` a request making it compute ``tokens``: it joins the queue
        at once, and the replica's counter (which the caller raises by as much) is not
        counted a second time by ``follow``."""
        self.add(url, now, float(tokens), s_per_token)
        pending = self._by_url.get(url)
        if pending is not None:
            pending.seen += tokens

    def _new(self, url: str, now: float) -> PendingPrefill:
        if len(self._by_url) >= MAX_REPLICAS:
            self._drop_drained(now)
        pending = self._by_url[url] = PendingPrefill()
        return pending

    def add(self, url: str, now: float, tokens: float, s_per_token: float) -> None:
        """A request making ``url`` compute ``tokens`` prompt tokens was sent at ``now``;
        ``s_per_token`` is the replica's measured prefill seconds per token (0: not measured,
        PREFILL_S_PER_TOKEN_PRIOR)."""
        if not tokens > 0.0:
            return
        pending = self._by_url.get(url) or self._new(url, now)
        pending.tokens = pending.ahead(now) + tokens
        pending.at = now
        pending.s_per_token = drain_s_per_token(s_per_token)

    def _drop_drained(self, now: float) -> None:
        for url in [u for u, p in self._by_url.items() if p.ahead(now) <= 0.0]:
            del self._by_url[url]
        if len(self._by_url) >= MAX_REPLICAS:  # all busy: the oldest goes
            del self._by_url[min(self._by_url, key=lambda u: self._by_url[u].at)]

    def __len__(self) -> int:
        return len(self._by_url)
