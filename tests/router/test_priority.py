"""The router's batch rule over hand-built replica states: batch requests keep a reserve of
each replica's batch limit free for interactive ones, wait at the router when no replica has
room, in arrival order, and go anyway after the longest hold."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from multidict import CIMultiDict

from vllm_fleet.router.balancer import LeastBusy, RequestInfo
from vllm_fleet.router.priority import (
    BatchAware,
    BatchGate,
    PrioritizedRequest,
    classify,
    is_batch,
)
from vllm_fleet.router.speed import SpeedEstimate
from vllm_fleet.router.state import ReplicaState

NOW = 1000.0


def replica(url: str, in_flight: int, limit: float | None = 8.0) -> ReplicaState:
    r = ReplicaState(url=url, healthy=True, in_flight=in_flight, scraped_at=NOW - 0.5)
    r.in_flight_at_scrape = in_flight
    r.running = float(in_flight)
    r.speed = SpeedEstimate(token_s=0.02, batch_limit=limit)
    return r


def gate(interactive_ago: float | None = 1.0, **kwargs: float) -> BatchGate:
    g = BatchGate(clock=lambda: NOW, **kwargs)
    if interactive_ago is not None:
        g.saw_interactive(NOW - interactive_ago)
    return g


BATCH = PrioritizedRequest(model="m", batch=True)


def test_the_header_marks_a_request_batch_and_nothing_else_does() -> None:
    info = RequestInfo(model="m", prompt_tokens=7, max_tokens=3)
    marked = classify(info, CIMultiDict({"x-fleet-priority": " Batch "}))
    assert is_batch(marked) and marked.prompt_tokens == 7 and marked.max_tokens == 3
    assert not is_batch(classify(info, CIMultiDict({"X-Fleet-Priority": "interactive"})))
    assert not is_batch(classify(info, CIMultiDict()))


def test_a_quarter_of_the_batch_limit_is_kept_for_interactive_requests() -> None:
    g = gate()
    # limit 8, reserve 2: a batch request may make the 6th running request, not the 7th.
    assert g.with_room([replica("a", 5)], NOW)
    assert not g.with_room([replica("a", 6)], NOW)
    assert g.reserve(8.0, NOW) == 2.0 and g.reserve(2.0, NOW) == 1.0


def test_without_recent_interactive_traffic_a_batch_fills_the_whole_batch() -> None:
    assert gate(interactive_ago=None).with_room([replica("a", 7)], NOW)
    assert gate(interactive_ago=301.0).with_room([replica("a", 7)], NOW)
    assert not gate(interactive_ago=299.0).with_room([replica("a", 7)], NOW)


def test_a_replica_with_no_learned_limit_takes_the_fleets_and_none_learned_means_no_rule() -> None:
    g = gate()
    fresh = replica("new", 6, limit=None)
    assert [r.url for r in g.with_room([replica("a", 0), fresh], NOW)] == ["a"]
    assert g.with_room([replica("x", 50, limit=None)], NOW)


def test_batch_requests_go_only_where_room_is_left_interactive_ones_anywhere() -> None:
    g = gate()
    policy = BatchAware(LeastBusy(random.Random(1)), g, clock=lambda: NOW)
    full, roomy = replica("full", 6, limit=8.0), replica("roomy", 10, limit=32.0)
    # least-busy alone prefers "full" (6 < 10); the batch request may only go to "roomy".
    assert policy.pick([full, roomy], BATCH).url == "roomy"
    assert policy.pick([full, roomy], RequestInfo(model="m")).url == "full"
    # with no room anywhere (the hold ran out), any candidate: never refused
    assert policy.pick([full], BATCH).url == "full"


def test_interactive_requests_keep_the_reserve_alive() -> None:
    g = BatchGate(clock=lambda: NOW)
    policy = BatchAware(LeastBusy(random.Random(1)), g, clock=lambda: NOW)
    assert g.with_room([replica("a", 7)], NOW)
    policy.pick([replica("a", 0)], RequestInfo(model="m"))
    assert not g.with_room([replica("a", 7)], NOW)


def test_held_requests_leave_in_arrival_order_when_room_appears() -> None:
    async def main() -> tuple[list[int], int]:
        g = gate(poll_s=0.001, max_hold_s=5.0)
        fleet: list[ReplicaState] = [replica("a", 6)]
        left: list[int] = []

        def candidates() -> Sequence[ReplicaState]:
            return fleet

        async def one(n: int) -> None:
            await g.wait_for_room(candidates)
            left.append(n)
            fleet[0].in_flight += 1  # it was sent: the slot it found is taken again
            fleet[0].in_flight_at_scrape += 1
            fleet[0].running += 1

        tasks = [asyncio.create_task(one(n)) for n in range(3)]
        for _ in range(100):
            await asyncio.sleep(0.002)
        held = g.held
        for _ in range(3):  # a slot frees three times, and each time one request leaves
            fleet[0].in_flight -= 1
            fleet[0].in_flight_at_scrape -= 1
            fleet[0].running -= 1
            for _ in range(200):
                if len(left) == 3 - g.held:
                    break
                await asyncio.sleep(0.002)
        await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
        return left, held

    left, held = asyncio.run(main())
    assert held == 3
    assert left == [0, 1, 2]


def test_a_held_request_goes_anyway_after_the_longest_hold() -> None:
    async def main() -> tuple[float, int, int]:
        g = gate(poll_s=0.005, max_hold_s=0.1)
        waited = await asyncio.wait_for(g.wait_for_room(lambda: [replica("a", 8)]), 2.0)
        return waited, g.overdue, g.held

    waited, overdue, held = asyncio.run(main())
    assert 0.1 <= waited < 1.0 and overdue == 1 and held == 0
