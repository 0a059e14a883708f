"""Circuit-breaker transitions (explicit clock) and active checks against small test servers."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from tests.router.conftest import ServeFake
from vllm_fleet.router.health import (
    MAX_UNCHECKED_S,
    MODELS_REFRESH_S,
    BreakerPolicy,
    apply_check,
    begin_check,
    check_due,
    check_replica,
    check_round,
    health_loop,
    probe_due,
    probe_replica,
    record_failure,
    record_success,
)
from vllm_fleet.router.state import Breaker, Fleet, ReplicaState
from vllm_fleet.router.upstream_client import UpstreamClient

POLICY = BreakerPolicy(failure_threshold=3, cooldown_s=5.0, max_cooldown_s=40.0, stable_s=60.0)
DEADLINE_S = 10.0


def admitted(url: str = "http://a:1", now: float = 100.0) -> ReplicaState:
    """A replica that passed its first health check at ``now``."""
    r = ReplicaState(url=url)
    apply_check(r, True, now, POLICY)
    assert r.healthy
    return r


# --- pure transitions ------------------------------------------------------------------------


def test_consecutive_failures_eject_at_threshold() -> None:
    r = admitted()
    assert record_failure(r, 101.0, POLICY) is False
    assert record_failure(r, 102.0, POLICY) is False
    assert r.healthy and r.breaker is Breaker.CLOSED
    assert record_failure(r, 103.0, POLICY) is True
    assert (r.breaker, r.healthy, r.ejections) == (Breaker.OPEN, False, 1)
    assert (r.opened_at, r.cooldown_s) == (103.0, 5.0)


def test_success_resets_the_consecutive_count() -> None:
    r = admitted()
    for t in range(10):
        record_failure(r, 101.0 + t, POLICY)
        record_failure(r, 101.5 + t, POLICY)
        record_success(r, 101.7 + t)
    assert (r.breaker, r.ejections, r.consecutive_failures) == (Breaker.CLOSED, 0, 0)


@pytest.mark.parametrize(
    ("eject_on_refused", "ejected"), [pytest.param(True, True), pytest.param(False, False)]
)
def test_refused_connection_ejects_at_once(eject_on_refused: bool, ejected: bool) -> None:
    r = admitted()
    policy = BreakerPolicy(eject_on_refused=eject_on_refused)
    assert record_failure(r, 101.0, policy, refused=True) is ejected
    assert r.healthy is not ejected


def test_open_ignores_late_results_and_waits_for_cooldown() -> None:
    r = admitted()
    record_failure(r, 101.0, POLICY, refused=True)
    # requests sent before the ejection finish late: neither outcome changes anything
    assert record_failure(r, 102.0, POLICY) is False
    record_success(r, 102.5)
    assert (r.breaker, r.ejections, r.consecutive_failures) == (Breaker.OPEN, 1, 1)
    assert not probe_due(r, 105.9)
    begin_check(r, 105.9)
    assert r.breaker is Breaker.OPEN
    assert probe_due(r, 106.0)


def test_half_open_probe_success_closes() -> None:
    r = admitted()
    record_failure(r, 101.0, POLICY, refused=True)
    begin_check(r, 106.0)
    assert (r.breaker, r.healthy) == (Breaker.HALF_OPEN, False)
    apply_check(r, True, 106.1, POLICY)
    assert (r.breaker, r.healthy, r.consecutive_failures) == (Breaker.CLOSED, True, 0)
    assert r.ejections == 1


def test_late_passive_results_do_not_decide_the_probe() -> None:
    r = admitted()
    record_failure(r, 101.0, POLICY, refused=True)
    begin_check(r, 106.0)
    record_success(r, 106.1)  # a request from before the ejection, finishing late
    assert r.breaker is Breaker.HALF_OPEN
    assert record_failure(r, 106.2, POLICY) is False
    assert r.breaker is Breaker.HALF_OPEN
    apply_check(r, True, 106.3, POLICY)
    assert (r.breaker, r.healthy) == (Breaker.CLOSED, True)


def test_failures_far_apart_are_not_a_streak() -> None:
    r = admitted()
    record_failure(r, 101.0, POLICY)
    record_failure(r, 102.0, POLICY)
    # an hour without traffic: the third failure starts a new streak
    assert record_failure(r, 3700.0, POLICY) is False
    assert r.consecutive_failures == 1
    assert record_failure(r, 3701.0, POLICY) is False
    assert record_failure(r, 3702.0, POLICY) is True


def test_half_open_probe_failure_reopens_with_the_same_cooldown() -> None:
    """A replica that is down is probed every cool-down, so it is back soon after it is up."""
    r = admitted()
    record_failure(r, 101.0, POLICY, refused=True)
    now, cooldowns = 101.0, []
    for _ in range(6):
        now += r.cooldown_s
        assert probe_due(r, now)
        begin_check(r, now)
        apply_check(r, False, now, POLICY)
        assert r.breaker is Breaker.OPEN and not r.healthy
        cooldowns.append(r.cooldown_s)
    assert cooldowns == [5.0] * 6
    assert r.ejections == 1  # failed probes are not new ejections
    now += r.cooldown_s
    begin_check(r, now)
    apply_check(r, True, now, POLICY)
    assert r.healthy and r.breaker is Breaker.CLOSED


def test_flapping_replica_gets_longer_cooldowns_stable_one_starts_over() -> None:
    r = admitted()
    record_failure(r, 101.0, POLICY, refused=True)
    begin_check(r, 106.0)
    apply_check(r, True, 106.0, POLICY)
    # fails again soon after recovering: doubled cool-down
    assert record_failure(r, 110.0, POLICY, refused=True)
    assert (r.cooldown_s, r.ejections) == (10.0, 2)
    begin_check(r, 120.0)
    apply_check(r, True, 120.0, POLICY)
    # stays up longer than stable_s: the next ejection starts from the base cool-down
    assert record_failure(r, 200.0, POLICY, refused=True)
    assert (r.cooldown_s, r.ejections) == (5.0, 3)


def test_active_check_failure_removes_at_once_and_pass_restores() -> None:
    r = admitted()
    apply_check(r, False, 101.0, POLICY)
    assert (r.healthy, r.breaker, r.consecutive_failures) == (False, Breaker.CLOSED, 1)
    apply_check(r, True, 102.0, POLICY)
    assert r.healthy


def test_failing_checks_eject_a_replica_that_was_up() -> None:
    r = admitted()
    for t in (101.0, 102.0, 103.0):
        apply_check(r, False, t, POLICY)
    assert (r.breaker, r.ejections) == (Breaker.OPEN, 1)
    # /health passing again does not bypass the cool-down
    apply_check(r, True, 104.0, POLICY)
    assert not r.healthy


def test_starting_replica_is_not_ejected() -> None:
    r = ReplicaState(url="http://a:1")
    for t in range(100):
        apply_check(r, False, float(t), POLICY, refused=True)
    assert (r.breaker, r.ejections, r.healthy) == (Breaker.CLOSED, 0, False)
    apply_check(r, True, 100.0, POLICY)
    assert r.healthy


def test_passing_checks_do_not_hide_passive_failures() -> None:
    r = admitted()
    # /health is fine but completions fail: the breaker must still open
    for t in (101.0, 102.0, 103.0):
        record_failure(r, t, POLICY)
        apply_check(r, True, t + 0.5, POLICY)
    assert (r.breaker, r.healthy, r.ejections) == (Breaker.OPEN, False, 1)


# --- active checks against test servers -------------------------------------------------------


@dataclass
class FakeVllm:
    """Serves /health and /v1/models; ``mode`` switches between ok, error (500), hang and
    redirect (307 to ``redirect_to``)."""

    models: list[str] = field(default_factory=lambda: ["m"])
    mode: str = "ok"
    redirect_to: str = ""
    models_body: bytes | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    health_hits: int = 0
    models_hits: int = 0

    async def _misbehave(self) -> web.Response | None:
        if self.mode == "hang":
            await asyncio.wait_for(self.release.wait(), 30)
        if self.mode == "error":
            return web.Response(status=500, text="engine dead")
        if self.mode == "redirect":
            return web.Response(status=307, headers={"Location": self.redirect_to})
        return None

    async def health(self, request: web.Request) -> web.Response:
        self.health_hits += 1
        return await self._misbehave() or web.Response(text="")

    async def list_models(self, request: web.Request) -> web.Response:
        self.models_hits += 1
        if self.models_body is not None:
            return web.Response(body=self.models_body, content_type="application/json")
        data = [{"id": m, "object": "model", "owned_by": "vllm"} for m in self.models]
        return await self._misbehave() or web.json_response({"object": "list", "data": data})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.list_models)
        return app


StartFake = Callable[..., Awaitable[tuple[FakeVllm, str]]]


@pytest.fixture
def start_fake(serve_fake: ServeFake) -> StartFake:
    async def start(**kwargs: object) -> tuple[FakeVllm, str]:
        fake = FakeVllm(**kwargs)  # type: ignore[arg-type]
        return fake, await serve_fake(fake)

    return start


def refused_url() -> str:
    """A 127.0.0.1 port with nothing listening (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_check_passes_and_learns_models(
    start_fake: StartFake, client: UpstreamClient
) -> None:
    fake, url = await start_fake(models=["m", "m-alias"])
    r = ReplicaState(url=url)
    assert await check_replica(client, r, 1.0)
    assert r.models == frozenset({"m", "m-alias"})
    assert fake.models_hits == 1
    # models are known now: the next checks only hit /health until the refresh is due
    assert await check_replica(client, r, 1.0)
    assert fake.models_hits == 1
    r.models_at -= MODELS_REFRESH_S
    fake.models = ["m2"]
    assert await check_replica(client, r, 1.0)
    assert (fake.models_hits, r.models) == (2, frozenset({"m2"}))


@pytest.mark.parametrize(
    "models_body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"data": []}', id="no-models"),
        pytest.param(b'{"object": "list"}', id="no-data"),
    ],
)
async def test_check_fails_on_bad_model_list(
    start_fake: StartFake, client: UpstreamClient, models_body: bytes
) -> None:
    _, url = await start_fake(models_body=models_body)
    assert not await check_replica(client, ReplicaState(url=url), 1.0)


async def test_check_fails_on_500(start_fake: StartFake, client: UpstreamClient) -> None:
    _, url = await start_fake(mode="error")
    outcome = await probe_replica(client, ReplicaState(url=url), 1.0)
    assert not outcome.ok and not outcome.refused
    assert "500" in outcome.detail


async def test_check_fails_on_a_redirect_even_to_a_healthy_server(
    start_fake: StartFake, client: UpstreamClient
) -> None:
    """A replica's health is its own: a redirect is not followed to another server's answer."""
    healthy, elsewhere = await start_fake()
    _, url = await start_fake(mode="redirect", redirect_to=f"{elsewhere}/health")
    outcome = await probe_replica(client, ReplicaState(url=url), 1.0)
    assert not outcome.ok
    assert "307" in outcome.detail
    assert healthy.health_hits == 0


async def test_check_respects_timeout_on_hanging_server(
    start_fake: StartFake, client: UpstreamClient
) -> None:
    _, url = await start_fake(mode="hang")
    started = time.monotonic()
    outcome = await probe_replica(client, ReplicaState(url=url), 0.2)
    assert not outcome.ok
    assert "timeout" in outcome.detail
    assert time.monotonic() - started < 2.0


async def test_check_reports_refused_connection(client: UpstreamClient) -> None:
    outcome = await probe_replica(client, ReplicaState(url=refused_url()), 1.0)
    assert not outcome.ok and outcome.refused


async def test_health_loop_sorts_good_from_bad(
    start_fake: StartFake, client: UpstreamClient
) -> None:
    good_fake, good = await start_fake()
    hanging_fake, hanging = await start_fake(mode="hang")
    _, failing = await start_fake(mode="error")
    down = refused_url()
    fleet = Fleet()
    fleet.set_backends([good, hanging, failing, down])
    task = asyncio.create_task(
        health_loop(fleet, client, interval_s=0.02, timeout_s=5.0, breaker=POLICY)
    )
    try:
        await wait_until(lambda: good_fake.health_hits >= 5, "five checks")
        # the hanging replica's one check is still pending (5 s timeout) and did not hold the
        # others back
        assert hanging_fake.health_hits == 1
        assert fleet.replicas[hanging].check_error == ""
        assert [r.url for r in fleet.healthy()] == [good]
        assert fleet.served_models() == ["m"]
        assert "500" in fleet.replicas[failing].check_error
        assert fleet.replicas[down].check_error.startswith("connect")
        for url in (hanging, failing, down):
            r = fleet.replicas[url]
            # never up: "still starting", not ejected
            assert (r.check_ok, r.breaker, r.ejections) == (False, Breaker.CLOSED, 0)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_health_loop_ejects_failing_replica_and_readmits_after_cooldown(
    start_fake: StartFake, client: UpstreamClient
) -> None:
    fake, url = await start_fake()
    fleet = Fleet()
    fleet.set_backends([url])
    policy = BreakerPolicy(failure_threshold=2, cooldown_s=0.3, max_cooldown_s=0.3)
    task = asyncio.create_task(
        health_loop(fleet, client, interval_s=0.02, timeout_s=0.2, breaker=policy)
    )
    try:
        r = fleet.replicas[url]
        await wait_until(lambda: r.healthy, "replica admitted")
        fake.mode = "error"
        await wait_until(lambda: r.breaker is Breaker.OPEN, "replica ejected")
        assert r.ejections == 1 and not r.healthy
        hits_when_opened = fake.health_hits
        fake.mode = "ok"
        await wait_until(lambda: r.healthy, "replica re-admitted")
        assert r.breaker is Breaker.CLOSED
        # while OPEN the checker waited for the cool-down (~15 rounds) instead of polling
        assert fake.health_hits - hits_when_opened <= 3
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_health_loop_follows_fleet_membership(
    start_fake: StartFake, client: UpstreamClient
) -> None:
    first_fake, first = await start_fake()
    second_fake, second = await start_fake()
    fleet = Fleet()
    fleet.set_backends([first])
    task = asyncio.create_task(health_loop(fleet, client, interval_s=0.02, timeout_s=0.2))
    try:
        await wait_until(lambda: fleet.replicas[first].healthy, "first admitted")
        fleet.set_backends([second])
        await wait_until(lambda: fleet.replicas[second].healthy, "second admitted")
        hits = first_fake.health_hits
        await wait_until(lambda: second_fake.health_hits >= 5, "more rounds")
        assert first_fake.health_hits <= hits + 1  # at most the round in progress
        assert list(fleet.replicas) == [second]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_check_round_makes_the_fleet_ready_in_one_call(
    start_fake: StartFake, client: UpstreamClient
) -> None:
    _, first = await start_fake(models=["a"])
    _, second = await start_fake(models=["b"])
    fleet = Fleet()
    fleet.set_backends([first, second, refused_url()])
    await check_round(fleet, client, timeout_s=1.0)
    assert [r.url for r in fleet.healthy()] == [first, second]
    assert fleet.served_models() == ["a", "b"]


def test_a_replica_whose_answers_flow_is_checked_only_every_max_unchecked() -> None:
    r = admitted(now=100.0)
    r.checked_at = 100.0
    r.last_byte_at = 100.6
    assert not check_due(r, 101.0, 1.0)  # bytes 0.4 s ago: alive
    assert check_due(r, 101.1, 1.0)  # silent for half an interval: checked again
    r.last_byte_at = 109.9
    assert not check_due(r, 109.95, 1.0)
    assert check_due(r, 100.0 + MAX_UNCHECKED_S, 1.0)  # flowing, but unchecked too long
    r.check_ok = False  # the last check failed: bytes do not overrule it
    assert check_due(r, 109.95, 1.0)


def test_a_replica_cooling_down_is_not_checked_whatever_its_bytes() -> None:
    r = admitted(now=100.0)
    record_failure(r, 101.0, POLICY, refused=True)
    r.last_byte_at = 101.5  # a late answer from before the ejection
    assert not check_due(r, 102.0, 1.0)
    assert check_due(r, 101.0 + POLICY.cooldown_s, 1.0)  # the probe after the cool-down


async def test_health_loop_rests_while_answers_flow_and_resumes_when_they_stop(
    start_fake: StartFake, client: UpstreamClient
) -> None:
    """The loop's /health GETs stop while the replica's bytes keep coming (as a relay notes
    them) and start again one interval after the bytes stop."""
    fake, url = await start_fake()
    fleet = Fleet()
    fleet.set_backends([url])
    r = fleet.replicas[url]
    interval_s = 0.2
    task = asyncio.create_task(health_loop(fleet, client, interval_s=interval_s, timeout_s=1.0))
    try:
        await wait_until(lambda: r.healthy, "replica admitted")
        await wait_until(lambda: fake.health_hits >= 2, "a second check")
        r.last_byte_at = time.monotonic()
        hits = fake.health_hits
        for _ in range(50):  # 10 intervals with bytes arriving all along
            r.last_byte_at = time.monotonic()
            await asyncio.sleep(interval_s / 5)
        # at most the check already under way, and one more if the loop ran late once (every
        # interval would be 10)
        assert fake.health_hits <= hits + 2
        await wait_until(lambda: fake.health_hits >= hits + 3, "checks again once silent")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_cancelling_health_loop_cancels_pending_checks(
    start_fake: StartFake, client: UpstreamClient
) -> None:
    fake, url = await start_fake(mode="hang")
    fleet = Fleet()
    fleet.set_backends([url])
    task = asyncio.create_task(health_loop(fleet, client, interval_s=0.02, timeout_s=5.0))
    await wait_until(lambda: fake.health_hits == 1, "check started")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("health check")]


def test_cooldown_stays_finite_for_a_replica_flapping_for_days() -> None:
    r = admitted()
    now = 101.0
    for _ in range(5000):
        record_failure(r, now, POLICY, refused=True)
        now += r.cooldown_s
        begin_check(r, now)
        apply_check(r, True, now, POLICY)
        now += 1.0
    assert r.cooldown_s == POLICY.max_cooldown_s
    assert (r.breaker, r.ejections) == (Breaker.CLOSED, 5000)


def test_default_policy_readmits_a_restarted_replica_within_two_seconds() -> None:
    """Scenario 6 of docs/benchmarks.md: killed, down for 8 s, back: used again quickly."""
    policy = BreakerPolicy()
    r = admitted()
    assert record_failure(r, 100.0, policy, refused=True)  # killed: ejected at once
    now = 100.0
    while now < 108.0:  # down: the 1 s health loop probes whenever the cool-down has passed
        now += 1.0
        if probe_due(r, now):
            begin_check(r, now)
            apply_check(r, False, now, policy, refused=True)
        assert not r.healthy
    back_at = now
    while not r.healthy:
        now += 1.0
        if probe_due(r, now):
            begin_check(r, now)
            apply_check(r, True, now, policy)
    assert now - back_at <= 2.0


def test_cooldown_above_the_default_cap_is_honoured() -> None:
    r = admitted()
    policy = BreakerPolicy(cooldown_s=120.0)  # larger than the default max_cooldown_s
    record_failure(r, 101.0, policy, refused=True)
    assert r.cooldown_s == 120.0
