"""Prefix affinity in the cost policy: a guessed batch limit does not outweigh a cached prefix,
a measured one still spreads a hot prefix, and routers agree on a new prefix's home without
sharing state (hand-built replica states, a fixed clock)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

from vllm_fleet.router.balancer import (
    CostAware,
    RequestInfo,
    fleet_defaults,
    replica_speed,
    request_cost,
)
from vllm_fleet.router.prefix_home import rendezvous
from vllm_fleet.router.prefix_index import (
    BLOCK_BYTES,
    BYTES_PER_TOKEN,
    COARSE_BYTES,
    FINE_BYTES,
    prefix_keys,
)
from vllm_fleet.router.speed import SpeedEstimate
from vllm_fleet.router.state import ReplicaState

NOW = 1000.0
SYSTEM = "You are the support assistant of a large fleet of servers. " * 120  # ~7 KB


def replica(
    url: str, *, in_flight: int = 0, peak: float = 3.0, slowdown: float = 0.05
) -> ReplicaState:
    """A replica whose speed is learned but which never queued: its batch limit is only the
    most it was seen running (``peak``), as on a fleet at moderate load."""
    r = ReplicaState(url=url, healthy=True, in_flight=in_flight, scraped_at=NOW - 0.5)
    r.speed = SpeedEstimate(token_s=0.02, batch_slowdown=slowdown, prefill_s_per_token=1e-4)
    r.speed.peak_running = peak
    r.speed.recent_tokens, r.speed.recent_finished = 1000.0, 10.0  # 100 tokens per request
    return r


def request(text: str) -> RequestInfo:
    return RequestInfo(
        model="m",
        prompt_tokens=len(text.encode()) // BYTES_PER_TOKEN,
        max_tokens=100,
        prefix=prefix_keys("m", text),
    )


def policy(seed: int = 0) -> CostAware:
    return CostAware(random.Random(seed), clock=lambda: NOW)


def test_the_holder_at_its_seen_peak_keeps_a_mostly_cached_request() -> None:
    """The holder runs 3, the most it was ever seen running; going past that is only a guessed
    queue, and the request would compute 1,750 tokens anywhere else."""
    holder = replica("http://a:1", in_flight=3)
    others = [replica(f"http://o{i}:1", in_flight=2) for i in range(3)]
    holder.prefixes.record(prefix_keys("m", SYSTEM), NOW)
    for seed in range(10):
        info = request(SYSTEM + f"question {seed}?")
        assert policy(seed).pick([holder, *others], info).url == "http://a:1"


def test_a_new_prefix_still_avoids_a_replica_past_its_seen_peak() -> None:
    """Nobody holds the prefix: the guessed queue counts in full, as before prefix routing."""
    busy = replica("http://busy:1", in_flight=3)
    calm = replica("http://calm:1", in_flight=2)
    for seed in range(10):
        info = request(SYSTEM + f"question {seed}?")
        assert policy(seed).pick([busy, calm], info).url == "http://calm:1"


def test_a_few_shared_blocks_do_not_pull_a_request_onto_a_busy_replica() -> None:
    """Two cached blocks of a 2,000-token prompt: the guessed queue keeps almost all its weight."""
    busy, calm = replica("http://busy:1", in_flight=3), replica("http://calm:1", in_flight=1)
    greeting = "Hello! You are a helpful assistant. Please answer the question below. " * 4
    busy.prefixes.record(prefix_keys("m", greeting[: 2 * BLOCK_BYTES]), NOW)
    info = request(greeting[: 2 * BLOCK_BYTES] + "Unrelated long document. " * 300)
    assert busy.prefixes.cached_tokens(info.prefix) > 0
    for seed in range(10):
        assert policy(seed).pick([busy, calm], info).url == "http://calm:1"


def test_the_holder_s_guessed_limit_is_at_least_the_fleet_s_peak() -> None:
    """A conversation's holder runs 4, the most it was seen running, while a neighbour was seen
    running 7: its limit is a guess no higher than its neighbours', so the next turn (70 %
    cached there) stays instead of being computed again on a replica running one fewer."""
    conv = SYSTEM[:3000]
    info = request(conv + " next question about the fleet, in some detail please " * 12)
    for seed in range(10):
        holder = replica("http://a:1", in_flight=4, peak=4.0)
        others = [replica("http://o0:1", in_flight=3, peak=7.0)]
        others.append(replica("http://o1:1", in_flight=3, peak=5.0))
        holder.prefixes.record(prefix_keys("m", conv), NOW)
        assert holder.prefixes.cached_tokens(info.prefix) > 0.6 * info.prompt_tokens
        assert policy(seed).pick([holder, *others], info).url == "http://a:1"


def test_a_hot_prefix_spreads_once_its_holder_is_seen_queueing() -> None:
    """On replicas whose batch barely slows a step (GPU-like), the group stays with its holder
    past the 3 it was seen running (a guess, not a queue). Once the holder's counters show a
    full batch of 8 (vllm_fleet.router.speed learns the limit), the queue is measured, priced in
    full, and the group spreads to the others."""
    replicas = [replica(f"http://r{i}:1", slowdown=0.01) for i in range(4)]
    system = (SYSTEM * 2)[: FINE_BYTES + 9 * COARSE_BYTES]  # ends on a block: all of it cached
    p = policy(1)
    sent: Counter[str] = Counter()

    def send(i: int) -> str:
        text = system + f"user {i} asks something else?"
        chosen = p.pick(replicas, request(text))
        chosen.prefixes.record(prefix_keys("m", text), NOW)
        chosen.in_flight += 1
        sent[chosen.url] += 1
        return chosen.url

    holder = send(0)
    for i in range(1, 8):
        assert send(i) == holder
    for r in replicas:  # the holder queued at 8: every replica of the fleet now has that limit
        r.speed.batch_limit = 8.0
    for i in range(8, 32):
        send(i)
    assert len(sent) == 4, sent
    assert max(sent.values()) <= 9, sent


def test_two_routers_send_a_new_prefix_to_the_same_replica() -> None:
    """Two routers with their own records and random draws, in front of equal replicas: each
    new prefix goes to the same replica from both (its rendezvous home), and the homes of many
    prefixes spread over all replicas."""
    first = [replica(f"http://r{i}:8000") for i in range(4)]
    second = [replica(f"http://r{i}:8000") for i in range(4)]
    homes: Counter[str] = Counter()
    for g in range(40):
        info = request(f"System prompt of group {g}. " * 100 + "question?")
        a, b = policy(1).pick(first, info), policy(2).pick(second, info)
        assert a.url == b.url
        homes[a.url] += 1
    assert len(homes) == 4 and min(homes.values()) >= 4, homes


def test_removing_a_replica_moves_only_the_prefixes_it_was_home_to() -> None:
    urls = [f"http://r{i}:8000" for i in range(4)]
    keys = [prefix_keys("m", f"group {g} " * 300)[15] for g in range(200)]
    before = {k: max(urls, key=lambda u: rendezvous(k, u)) for k in keys}
    after = {k: max(urls[:3], key=lambda u: rendezvous(k, u)) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == urls[3] for k in moved)


def test_prefix_keys_are_the_same_in_every_process() -> None:
    """Keys do not depend on Python's per-process hash seed, so routers agree on homes."""
    text = SYSTEM + "and a question"
    code = (
        "import json; from vllm_fleet.router.prefix_index import prefix_keys; "
        f"print(json.dumps(prefix_keys('m', {text!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert tuple(json.loads(out.stdout)) == prefix_keys("m", text)


def test_the_next_turn_counts_the_reply_the_holder_cached() -> None:
    """vLLM caches the reply with the prompt, and the next turn sends both back: the holder of
    the conversation is predicted to hold its mean reply past the prompt it served. A request
    whose match ends inside that prompt gets no such credit."""
    turn1 = SYSTEM + "user: how do I drain a replica?"
    reply = " Run the drain command, then wait until its requests finish." * 6  # ~90 tokens
    turn2 = turn1 + "\x1eassistant\x1f" + reply + "\x1euser\x1fand then?"
    holder = replica("http://a:1")
    holder.prefixes.record(prefix_keys("m", turn1), NOW)
    keys = prefix_keys("m", turn2)
    fresh = prefix_keys("m", SYSTEM[:4096] + "user: something else entirely, " * 100)
    before = holder.prefixes.cached_tokens(keys), holder.prefixes.cached_tokens(fresh)
    holder.prefixes.reply_tokens = 90.0
    assert holder.prefixes.cached_tokens(keys) == before[0] + 90.0
    assert holder.prefixes.cached_tokens(fresh) == before[1] > 0


def test_without_a_cached_prefix_the_cost_is_what_it_was() -> None:
    """Traffic that shares no prefix (scenarios 1-3) is priced exactly as before: the guessed
    queue counts in full wherever nothing of the prompt is cached."""
    busy = replica("http://busy:1", in_flight=5)
    info = request(SYSTEM + "a question nobody asked before")
    default, typical = fleet_defaults([busy])
    guessed = replica_speed(busy.speed, default)
    assert guessed.limit_assumed and guessed.batch_limit == 3.0
    measured = guessed._replace(limit_assumed=False)
    assert request_cost(busy, info, guessed, typical, NOW) == request_cost(
        busy, info, measured, typical, NOW
    )
