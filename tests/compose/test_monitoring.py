"""The `monitoring` profile of compose/docker-compose.cpu.yml for real: Prometheus scrapes the
router and both replicas (every target up), and every query of the Grafana dashboard
(helm/vllm-fleet/dashboards/vllm-fleet.json, the file the chart ships too) returns data from it
after a few requests, so no panel is empty because of a metric name the router or vLLM does not
export.

The replicas are the simulator (tests/compose/monitoring-sim.yml), which exports vLLM's metric
names, so the test takes well under a minute; Grafana itself is not started (its image needs a
registry, which CI does not have): the dashboard's queries are what it would send.
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionUserMessageParam

from tests.compose.support import (
    COMPOSE_DIR,
    REPO_ROOT,
    ROUTER_IMAGE,
    SAMPLE_ENV,
    TINY_MODEL,
    ComposeProject,
    compose_up,
    docker_client,
    get_json,
    leftovers,
    poll,
    require_images,
    unique_name,
)
from tests.support.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CPU_FILE = COMPOSE_DIR / "docker-compose.cpu.yml"
SIM_OVERRIDE = Path(__file__).with_name("monitoring-sim.yml")
DASHBOARD = REPO_ROOT / "helm" / "vllm-fleet" / "dashboards" / "vllm-fleet.json"
PROMETHEUS_IMAGE = "vllm-fleet-prometheus:0.1.0"
#: What Grafana would put in place of the dashboard's variables.
VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}
#: Bounds: the simulators and Prometheus start in seconds; a rate needs two scrapes (5 s apart).
TARGETS_UP_S = 60.0
QUERIES_ANSWER_S = 90.0


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, with the variables filled in."""
    queries: list[tuple[str, str]] = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            queries.append((panel["title"], expr))
    return queries


class Monitored:
    def __init__(self, router_port: int, prometheus_port: int) -> None:
        self.router = f"http://127.0.0.1:{router_port}"
        self.prometheus = f"http://127.0.0.1:{prometheus_port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        answer = get_json(url)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = get_json(f"{self.prometheus}/api/v1/targets")["data"][
            "activeTargets"
        ]
        return found

    def send_requests(self, count: int) -> None:
        """A few chats, streamed and not, so histograms, token counters and the router's
        learned speeds all move."""
        with self._client() as client:
            for i in range(count):
                if i % 2:
                    stream = client.chat.completions.create(
                        model=TINY_MODEL,
                        messages=[{"role": "user", "content": f"Question {i}?"}],
                        max_tokens=16,
                        stream=True,
                    )
                    assert sum(1 for _ in stream) > 0
                else:
                    self._chat(client, f"Question {i}?", 16)

    def send_burst(self, count: int) -> None:
        """``count`` chats at once (the client's pool gives each its own connection), so the
        policy spreads them."""
        with self._client() as client, ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda i: self._chat(client, f"Burst {i}?", 64), range(count)))

    def _client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.router}/v1", api_key="unused", max_retries=0)

    @staticmethod
    def _chat(client: OpenAI, content: str, max_tokens: int) -> None:
        messages = [ChatCompletionUserMessageParam(role="user", content=content)]
        reply = client.chat.completions.create(
            model=TINY_MODEL, messages=messages, max_tokens=max_tokens
        )
        assert reply.choices


@pytest.fixture(scope="module")
def monitored() -> Iterator[Monitored]:
    client = docker_client()
    require_images(client, ROUTER_IMAGE, PROMETHEUS_IMAGE)
    router_port, prometheus_port = free_port(), free_port()
    project = ComposeProject(
        unique_name("vftest-mon"),
        (CPU_FILE, SIM_OVERRIDE),
        env_files=(SAMPLE_ENV,),
        env=(
            ("COMPOSE_PROFILES", "monitoring"),
            ("ROUTER_PORT", str(router_port)),
            ("PROMETHEUS_PORT", str(prometheus_port)),
        ),
    )
    # Grafana is left out: its image needs a registry.
    services = ("replica-0", "replica-1", "router", "prometheus")
    with compose_up(project, client, up_args=services):
        yield Monitored(router_port, prometheus_port)
    assert leftovers(client, project.name) == []


def test_prometheus_scrapes_the_router_and_both_replicas(monitored: Monitored) -> None:
    def all_up() -> list[dict[str, Any]] | None:
        targets = monitored.targets()
        healthy = len(targets) == 3 and all(t["health"] == "up" for t in targets)
        return targets if healthy else None

    targets = poll(all_up, "the router and both replicas up in Prometheus", TARGETS_UP_S, 1.0)
    by_job = sorted((t["labels"]["job"], t["labels"]["instance"]) for t in targets)
    assert by_job == [
        ("vllm", "replica-0:8000"),
        ("vllm", "replica-1:8000"),
        ("vllm-fleet-router", "router:8000"),
    ]


def _has_data(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def test_every_dashboard_query_returns_data(monitored: Monitored) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20, "the dashboard lost panels"
    empty = queries
    deadline = time.monotonic() + QUERIES_ANSWER_S
    while empty and time.monotonic() < deadline:
        monitored.send_requests(6)
        empty = [(title, expr) for title, expr in empty if not _has_data(monitored.query(expr))]
        if empty:
            time.sleep(2.0)  # the next scrape (5 s interval) brings new samples
    assert empty == [], "dashboard queries without data:\n" + "\n".join(
        f"  {title}: {expr}" for title, expr in empty
    )
    # The share panel sums to one over the replicas: both got traffic, nothing else did. One
    # request at a time may all go to one replica (the policy's pick with nothing in flight);
    # a burst of concurrent ones is spread, and the share panel then has both.
    (share_expr,) = [e for t, e in queries if t == "Share of requests per replica"]
    monitored.send_burst(8)

    def both_shares() -> list[dict[str, Any]] | None:
        found = monitored.query(share_expr)
        return found if len(found) == 2 else None

    # the next scrape (5 s interval) brings the burst's samples
    shares = poll(both_shares, "both replicas in the share panel", QUERIES_ANSWER_S, 2.0)
    assert math.isclose(sum(float(s["value"][1]) for s in shares), 1.0, rel_tol=1e-6)
