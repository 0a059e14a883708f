"""Prometheus metrics and the one-line-per-request log."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.router import RouterHandle, eventually, post_raw, running_router
from tests.support.sim import SIM_MODEL, SimHandle, running_sim
from vllm_fleet.router.logs import JsonFormatter, TextFormatter
from vllm_fleet.router.state import Fleet, ReplicaState
from vllm_fleet.router.telemetry import Telemetry

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_request_counters_and_histograms(sims: list[SimHandle], router: RouterHandle) -> None:
    async with router.openai() as client:
        for _ in range(3):
            await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1)
        stream = await client.completions.create(
            model=SIM_MODEL, prompt="x", max_tokens=3, stream=True
        )
        _ = [c async for c in stream]
    await post_raw(f"{router.url}/v1/completions", b"{", {"Content-Type": "application/json"})
    samples = await scrape(router.url)
    per_replica = [
        value(samples, "vllm_fleet_requests_total", replica=s.url, status="200") for s in sims
    ]
    assert sum(per_replica) == 4
    assert value(samples, "vllm_fleet_requests_total", replica="none", status="400") == 1
    latency = sum(
        value(samples, "vllm_fleet_request_duration_seconds_count", replica=s.url) for s in sims
    )
    ttfb = sum(
        value(samples, "vllm_fleet_time_to_first_byte_seconds_count", replica=s.url) for s in sims
    )
    assert (latency, ttfb) == (4, 4)
    for s in sims:
        assert value(samples, "vllm_fleet_replica_healthy", replica=s.url) == 1
        assert value(samples, "vllm_fleet_replica_in_flight", replica=s.url) == 0
    assert sum(value(samples, "vllm_fleet_replica_served_total", replica=s.url) for s in sims) == 4
    assert value(samples, "vllm_fleet_retries_total", reason="connect") == 0


async def test_in_flight_gauge_during_a_stream() -> None:
    async with running_sim(step_ms=20.0) as sim, running_router([sim.url]) as router:
        async with router.openai() as client:
            stream = await client.completions.create(
                model=SIM_MODEL, prompt="x", max_tokens=100, stream=True
            )
            await stream.__aiter__().__anext__()
            samples = await scrape(router.url)
            assert value(samples, "vllm_fleet_replica_in_flight", replica=sim.url) == 1
            await stream.close()
        await eventually(lambda: router.fleet.replicas[sim.url].in_flight == 0, what="release")
        samples = await scrape(router.url)
        assert value(samples, "vllm_fleet_client_disconnects_total") == 1
        assert value(samples, "vllm_fleet_requests_total", replica=sim.url, status="499") == 1


async def test_retries_and_ejections_after_a_replica_dies(sims: list[SimHandle]) -> None:
    dead, alive = sims
    # Slow active checks and round-robin: the dead replica is found by real traffic.
    async with running_router(
        [s.url for s in sims], health_interval_s=30.0, policy="round-robin"
    ) as router:
        await dead.stop()
        async with router.openai() as client:
            for _ in range(4):
                await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1)
        samples = await scrape(router.url)
    assert value(samples, "vllm_fleet_retries_total", reason="connect") == 1
    failures = "vllm_fleet_upstream_failures_total"
    assert value(samples, failures, replica=dead.url, reason="connect") == 1
    assert value(samples, failures, replica=alive.url, reason="connect") == 0
    assert value(samples, "vllm_fleet_ejections_total", replica=dead.url) == 1
    assert value(samples, "vllm_fleet_replica_healthy", replica=dead.url) == 0
    assert value(samples, "vllm_fleet_replica_healthy", replica=alive.url) == 1
    assert value(samples, "vllm_fleet_requests_total", replica=alive.url, status="200") == 4


def test_collector_reads_the_fleet_at_scrape_time() -> None:
    fleet = Fleet()
    telemetry = Telemetry(fleet)
    fleet.replicas["http://a:1"] = ReplicaState(
        url="http://a:1", healthy=True, in_flight=3, waiting=2.0, kv_cache_usage=0.5, ejections=4
    )
    get = telemetry.registry.get_sample_value
    assert get("vllm_fleet_replica_in_flight", {"replica": "http://a:1"}) == 3
    assert get("vllm_fleet_replica_waiting", {"replica": "http://a:1"}) == 2
    assert get("vllm_fleet_replica_kv_cache_usage", {"replica": "http://a:1"}) == 0.5
    assert get("vllm_fleet_ejections_total", {"replica": "http://a:1"}) == 4
    del fleet.replicas["http://a:1"]
    assert get("vllm_fleet_replica_in_flight", {"replica": "http://a:1"}) is None


def test_learned_speed_is_exported_once_learned() -> None:
    """The dashboard plots the speeds the cost policy prices with: absent before any were
    learned (no made-up zero step time), the learned numbers after."""
    fleet = Fleet()
    telemetry = Telemetry(fleet)
    replica = ReplicaState(url="http://a:1", healthy=True)
    fleet.replicas[replica.url] = replica
    get = telemetry.registry.get_sample_value
    labels = {"replica": replica.url}
    assert get("vllm_fleet_replica_step_seconds", labels) is None
    replica.speed.token_s, replica.speed.batch_slowdown = 0.02, 0.3
    replica.speed.prefill_s_per_token = 0.001
    assert get("vllm_fleet_replica_step_seconds", labels) == 0.02
    assert get("vllm_fleet_replica_batch_slowdown", labels) == 0.3
    assert get("vllm_fleet_replica_prefill_seconds_per_token", labels) == 0.001


async def test_one_access_log_line_per_request(
    router: RouterHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vllm_fleet.access")
    async with router.openai() as client:
        await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1)
    (record,) = [r for r in caplog.records if r.name == "vllm_fleet.access"]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["method"] == "POST"
    assert fields["path"] == "/v1/completions"
    assert fields["model"] == SIM_MODEL
    assert fields["replica"] in router.fleet.replicas
    assert fields["status"] == 200
    assert fields["attempts"] == 1
    assert fields["latency_ms"] > 0
    assert len(fields["request_id"]) == 32
    text = TextFormatter().format(record)
    assert f"model={SIM_MODEL}" in text and "status=200" in text
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["status"] == 200 and parsed["level"] == "info"


def test_json_formatter_includes_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
        import sys

        record.exc_info = sys.exc_info()
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["message"] == "failed here"
    assert "ValueError: boom" in parsed["exception"]


async def test_metrics_endpoint_is_cheap_under_concurrency(router: RouterHandle) -> None:
    results = await asyncio.gather(*(scrape(router.url) for _ in range(10)))
    assert all(
        value(r, "vllm_fleet_replica_healthy", replica=u) == 1
        for r in results
        for u in router.fleet.replicas
    )
