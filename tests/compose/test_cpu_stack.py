"""compose/docker-compose.cpu.yml for real: two vLLM CPU replicas and the router in containers.

One project serves the whole module (a vLLM CPU replica needs a minute or two to load), under a
unique project name and router port, and is always taken down. The tests run in file order:
requests, then a crashed replica coming back, then `down -v` leaving nothing behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from openai import OpenAI, OpenAIError

from tests.compose.support import (
    COMPOSE_DIR,
    ENGINE_CPU_IMAGE,
    ENGINE_READY_S,
    ROUTER_IMAGE,
    SAMPLE_ENV,
    TINY_MODEL,
    ComposeProject,
    compose_up,
    container_ip,
    crash,
    docker_client,
    get_json,
    leftovers,
    poll,
    require_images,
    unique_name,
)
from tests.e2e.support import chat_many, shared_prefix_chat
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

CPU_FILE = COMPOSE_DIR / "docker-compose.cpu.yml"
REPLICAS = ("replica-0", "replica-1")


class Stack:
    def __init__(self, project: ComposeProject, client: docker.DockerClient, port: int) -> None:
        self.project = project
        self.client = client
        self.url = f"http://127.0.0.1:{port}"

    def openai(self) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60.0)

    def replicas(self) -> list[dict[str, Any]]:
        """The router's view: one row per replica it discovered (URL, health, served count)."""
        rows = get_json(f"{self.url}/fleet/replicas")
        assert isinstance(rows, list)
        return rows

    def served(self) -> dict[str, int]:
        return {row["url"]: int(row["served"]) for row in self.replicas()}

    def replica_url(self, service: str) -> str:
        (container,) = self.project.containers(self.client, service)
        return f"http://{container_ip(container)}:8000"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    client = docker_client()
    require_images(client, ROUTER_IMAGE, ENGINE_CPU_IMAGE)
    port = free_port()
    project = ComposeProject(
        unique_name("vftest-cpu"),
        (CPU_FILE,),
        env_files=(SAMPLE_ENV,),
        env=(("ROUTER_PORT", str(port)), ("ROUTER_BIND", "127.0.0.1")),
    )
    with compose_up(project, client) as up:
        stack = Stack(up, client, port)
        # `--wait` saw every container healthy; the router also has to have discovered both.
        poll(
            lambda: len([r for r in stack.replicas() if r["healthy"]]) == 2,
            "the router to list both replicas as healthy",
            deadline_s=60,
        )
        yield stack


def test_router_port_is_published_on_loopback_only(stack: Stack) -> None:
    (router,) = stack.project.containers(stack.client, "router")
    bindings = router.attrs["HostConfig"]["PortBindings"]["8000/tcp"]
    assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]


def test_chat_completion_through_the_router(stack: Stack) -> None:
    with stack.openai() as client:
        reply = client.chat.completions.create(
            model=TINY_MODEL,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
    assert reply.model == TINY_MODEL
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_completion_through_the_router(stack: Stack) -> None:
    with stack.openai() as client:
        reply = client.completions.create(
            model=TINY_MODEL,
            prompt="Once upon a time",
            max_tokens=8,
            temperature=0.0,
            extra_body={"ignore_eos": True},  # random weights: EOS may come first
        )
    assert reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens == 8


def test_streaming_chat_through_the_router(stack: Stack) -> None:
    with stack.openai() as client:
        stream = client.chat.completions.create(
            model=TINY_MODEL,
            messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=12,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) >= 2, f"expected a token stream, got {len(pieces)} content chunk(s)"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_both_replicas_serve(stack: Stack) -> None:
    before = stack.served()
    answers = [r.choices[0].message.content for r in asyncio.run(chat_many(stack.url, 12, 8))]
    assert all(answers)

    def both_served() -> dict[str, int] | None:
        after = stack.served()
        gained = {url: after.get(url, 0) - before.get(url, 0) for url in after}
        return gained if sum(gained.values()) >= 12 else None

    gained = poll(both_served, "the router to count the 12 requests", deadline_s=10)
    replica_urls = {stack.replica_url(s) for s in REPLICAS}
    assert set(gained) == replica_urls
    assert all(n > 0 for n in gained.values()), f"one replica served nothing: {gained}"


def test_the_router_matches_prefixes_by_the_replicas_kv_events(stack: Stack) -> None:
    """Precise prefix matching with no setup: the replicas publish KV events (port 5557), the
    router image carries transformers and the tiny model's tokenizer at the replicas' path, so
    a repeated system prompt is predicted cached from vLLM's own block hashes, and the blocks
    the router expected new prompts to store were the ones the replicas stored."""

    def kv_events() -> dict[str, dict[str, Any]]:
        return {r["url"]: r["prefix_cache"]["kv_events"] or {} for r in stack.replicas()}

    asked = 0

    def ask(group: int) -> dict[str, dict[str, Any]]:
        nonlocal asked
        asked += 1
        with stack.openai() as client:
            client.chat.completions.create(
                model=TINY_MODEL,
                messages=shared_prefix_chat(group, asked),
                max_tokens=2,
            )
        return kv_events()

    probes = 0

    def predicted_cached() -> bool:
        # A fresh system prompt each probe, asked three times: its blocks are stored (and
        # published) by the first ask, so the later ones are predicted cached once the router
        # is subscribed and its tokenizer loaded. One prompt asked again and again would wait
        # forever on a router that subscribed after the prompt was cached if the replay below
        # failed: cached blocks are not stored again while they stay cached.
        nonlocal probes
        probes += 1
        views = [ask(1000 + probes) for _ in range(3)]
        return any(
            v.get("precise_cached_tokens", 0) > 0 for view in views[1:] for v in view.values()
        )

    def confirmed() -> bool:
        view = ask(asked)  # a new system prompt: the router expects its first block stored
        return sum(int(v.get("ids_confirmed", 0)) for v in view.values()) >= 1

    # the tokenizer loads on the first request (until then the approximate index answers)
    try:
        poll(predicted_cached, "a request predicted cached from the replicas' KV events", 120, 0)
    except AssertionError:  # the router's log says why (its tokenizer, its subscriptions)
        (router,) = stack.project.containers(stack.client, "router")
        print(router.logs().decode()[-5000:])
        raise
    poll(confirmed, "a new prompt's first block confirmed stored as the router hashed it", 60, 0)
    view = kv_events()
    assert all(v.get("hashes_match") is not False for v in view.values()), view
    assert all(v.get("ids_match") is not False for v in view.values()), view

    # A restarted router (a rolling update, a crash) reads what the replicas cached before it
    # from their replay sockets (port 5558): blocks held with no request sent since.
    (router,) = stack.project.containers(stack.client, "router")
    router.restart(timeout=10)

    def replayed() -> dict[str, dict[str, Any]] | None:
        try:
            view = kv_events()
        except OSError:  # the router is still starting
            return None
        held = [v for v in view.values() if v.get("replayed", 0) > 0 and v.get("blocks", 0) > 0]
        return view if held else None

    view = poll(replayed, "the restarted router to replay the replicas' KV events", 90)
    assert all(v.get("missed", 0) == 0 for v in view.values()), view


def test_crashed_replica_restarts_and_rejoins(stack: Stack) -> None:
    (victim,) = stack.project.containers(stack.client, "replica-0")
    restarts_before = int(victim.attrs["RestartCount"])
    crash(victim)

    # Requests keep succeeding while replica-0 is down and loading again: the router fails
    # over to replica-1 and ejects replica-0 until it answers its health checks.
    failures = []
    with stack.openai() as client:
        deadline = time.monotonic() + ENGINE_READY_S
        ok = 0
        while time.monotonic() < deadline:
            try:
                reply = client.chat.completions.create(
                    model=TINY_MODEL, messages=[{"role": "user", "content": "ping"}], max_tokens=4
                )
                assert reply.choices[0].message.content is not None
                ok += 1
            except OpenAIError as exc:
                failures.append(repr(exc))
            victim.reload()
            health = victim.attrs["State"].get("Health", {}).get("Status")
            if int(victim.attrs["RestartCount"]) > restarts_before and health == "healthy":
                break
        else:
            raise AssertionError(
                f"replica-0 did not come back healthy within {ENGINE_READY_S:g}s:\n"
                f"{stack.project.logs()}"
            )
    assert not failures, f"{len(failures)} request(s) failed during the crash: {failures[:3]}"
    assert ok > 0
    assert victim.attrs["State"]["Running"]

    # It rejoins: the router finds it again (its address may have changed) and sends it work.
    url = stack.replica_url("replica-0")
    poll(
        lambda: any(r["url"] == url and r["healthy"] for r in stack.replicas()),
        f"the router to list the restarted replica-0 ({url}) as healthy",
        deadline_s=60,
    )
    before = stack.served().get(url, 0)

    def served_by_restarted() -> bool:
        asyncio.run(chat_many(stack.url, 6, 8))
        return stack.served().get(url, 0) > before

    poll(served_by_restarted, "the restarted replica-0 to serve requests again", deadline_s=60)


def test_down_leaves_nothing_behind(stack: Stack) -> None:
    stack.project.run("down", "-v", "--timeout", "5", timeout=180)
    assert leftovers(stack.client, stack.project.name) == []
    with pytest.raises(OSError):
        stack.replicas()
