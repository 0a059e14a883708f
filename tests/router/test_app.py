"""The router app: its own endpoints, OpenAI-style errors, paths, headers and lifecycle."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.support.router import (
    RouterHandle,
    eventually,
    get_json,
    post_raw,
    running_recorder,
    running_router,
)
from tests.support.sim import SIM_MODEL, SimHandle, running_sim
from vllm_fleet.router.app import make_app
from vllm_fleet.router.balancer import RequestInfo
from vllm_fleet.router.config import RouterConfig
from vllm_fleet.router.context import ROUTER
from vllm_fleet.router.errors import ConfigError
from vllm_fleet.router.state import ReplicaState

pytestmark = pytest.mark.timeout(60)

JSON = {"Content-Type": "application/json"}


def assert_openai_error(body: bytes, *, param: str | None = None) -> dict[str, Any]:
    payload = json.loads(body)
    assert set(payload) == {"error"}
    error: dict[str, Any] = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    assert error["param"] == param
    assert "Traceback" not in error["message"]
    return error


async def test_health_is_always_ok_and_ready_follows_the_replicas(
    sims: list[SimHandle], router: RouterHandle
) -> None:
    status, body = await get_json(f"{router.url}/ready")
    assert (status, body["healthy"]) == (200, 2)
    for sim in sims:
        await sim.control(healthy=False)
    await eventually(lambda: not router.fleet.healthy(), what="all replicas unhealthy")
    status, body = await get_json(f"{router.url}/ready")
    assert status == 503
    assert body["error"]["code"] == "no_healthy_replica"
    status, body = await get_json(f"{router.url}/health")
    assert (status, body) == (200, {"status": "ok"})


async def test_ready_turns_503_while_draining(router: RouterHandle) -> None:
    await router.app.shutdown()  # the on_shutdown hooks the runner calls on SIGTERM
    status, body = await get_json(f"{router.url}/ready")
    assert status == 503
    assert body["error"]["code"] == "shutting_down"


async def test_no_healthy_replica_is_503_with_retry_after(
    sims: list[SimHandle], router: RouterHandle
) -> None:
    for sim in sims:
        await sim.control(healthy=False)
    await eventually(lambda: not router.fleet.healthy(), what="all replicas unhealthy")
    status, headers, body = await post_raw(
        f"{router.url}/v1/completions", b'{"model": "sim-model", "prompt": "x"}', JSON
    )
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert_openai_error(body)


async def test_models_are_the_union_over_healthy_replicas() -> None:
    async with (
        running_sim(model="alpha") as a,
        running_sim(model="beta") as b,
        running_router([a.url, b.url]) as router,
    ):
        status, body = await get_json(f"{router.url}/v1/models")
        assert status == 200
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["alpha", "beta"]
        assert all(m["object"] == "model" for m in body["data"])
        await b.control(healthy=False)
        await eventually(lambda: len(router.fleet.healthy()) == 1, what="beta unhealthy")
        _, body = await get_json(f"{router.url}/v1/models")
        assert [m["id"] for m in body["data"]] == ["alpha"]


async def test_fleet_replicas_lists_every_replica(
    sims: list[SimHandle], router: RouterHandle
) -> None:
    status, rows = await get_json(f"{router.url}/fleet/replicas")
    assert status == 200
    assert sorted(r["url"] for r in rows) == sorted(s.url for s in sims)
    for row in rows:
        assert row["healthy"] is True
        assert row["breaker"] == "closed"
        assert row["models"] == [SIM_MODEL]
        for key in ("in_flight", "waiting", "running", "kv_cache_usage", "served", "ejections"):
            assert isinstance(row[key], int | float)
        assert row["speed"]["step_s"] is None  # nothing generated yet: nothing learned


async def test_fleet_replicas_shows_the_speed_the_router_learned(
    sims: list[SimHandle], router: RouterHandle
) -> None:
    body = json.dumps({"model": SIM_MODEL, "prompt": "x", "max_tokens": 32}).encode()

    async def learned() -> bool:
        await asyncio.gather(
            *(post_raw(f"{router.url}/v1/completions", body, JSON) for _ in range(4))
        )
        _, rows = await get_json(f"{router.url}/fleet/replicas")
        # The speed comes from counters, so it can be learned from requests that ran between
        # two scrapes; the peak needs a scrape that caught one running, and the request size a
        # scrape that saw a request finish.
        return all(
            r["speed"]["step_s"]
            and r["speed"]["peak_running"] >= 1
            and r["speed"]["tokens_per_request"] is not None
            for r in rows
        )

    for _ in range(40):  # bounded: each round is 4 short requests
        if await learned():
            break
    _, rows = await get_json(f"{router.url}/fleet/replicas")
    for row in rows:
        speed = row["speed"]
        assert speed["step_s"] > 0, row
        assert speed["batch_slowdown"] > 0
        assert speed["peak_running"] >= 1
        # tokens and finished requests are counted per scrape interval, so a request that
        # spans two intervals splits its tokens between them: near 32, not exactly.
        assert 0 < speed["tokens_per_request"] <= 64


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        (b"[1, 2]", 400, None),
        (b'"text"', 400, None),
        (b'{"prompt": "x"}', 400, "model"),
        (b'{"model": 7, "prompt": "x"}', 400, "model"),
        (b'{"model": "nope", "prompt": "x"}', 404, "model"),
    ],
)
async def test_bad_requests_get_openai_errors(
    router: RouterHandle, body: bytes, status: int, param: str | None
) -> None:
    got, headers, answer = await post_raw(f"{router.url}/v1/completions", body, JSON)
    assert got == status
    assert headers["Content-Type"].startswith("application/json")
    error = assert_openai_error(answer, param=param)
    if status == 404:
        assert SIM_MODEL in error["message"]  # lists the served models
    assert sum(router.served().values()) == 0


async def test_unknown_model_via_the_openai_client(router: RouterHandle) -> None:
    async with router.openai() as client:
        with pytest.raises(openai.NotFoundError, match=SIM_MODEL):
            await client.completions.create(model="gpt-unknown", prompt="x")
        card = await client.models.retrieve(SIM_MODEL)
        assert card.id == SIM_MODEL
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-unknown")


async def test_body_over_the_limit_is_413(sims: list[SimHandle]) -> None:
    async with running_router([s.url for s in sims], max_body_bytes=1000) as router:
        small = json.dumps({"model": SIM_MODEL, "prompt": "x" * 900, "max_tokens": 1}).encode()
        assert len(small) <= 1000
        status, _, _ = await post_raw(f"{router.url}/v1/completions", small, JSON)
        assert status == 200
        big = json.dumps({"model": SIM_MODEL, "prompt": "x" * 2000}).encode()
        status, _, body = await post_raw(f"{router.url}/v1/completions", big, JSON)
        assert status == 413
        assert "--max-body-bytes" in assert_openai_error(body)["message"]
        # the same body chunked (no Content-Length), arriving whole with its head
        reader, writer = await asyncio.open_connection("127.0.0.1", int(router.url.rsplit(":")[-1]))
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + b"%x\r\n%b\r\n0\r\n\r\n"
            % (len(big), big)
        )
        head, _, answer = (await reader.read()).partition(b"\r\n\r\n")
        writer.close()
        assert head.split(b" ")[1] == b"413", head
        assert "--max-body-bytes" in assert_openai_error(answer)["message"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("POST", "/admin", 404),
        ("POST", "/v2/completions", 404),
        ("POST", "/health", 405),
        ("GET", "/v1/completions", 405),
        ("DELETE", "/v1/models", 405),
        ("POST", "/v1/%2e%2e/metrics", 404),
        ("POST", "/v1/./completions", 404),
        ("POST", "/v1/a/%2E%2E/%2E%2E/health", 404),
        ("POST", "/v1/completions%2F..%2F..%2Fhealth", 404),
        ("POST", "/v1//completions", 404),
    ],
)
async def test_routes_outside_the_api_are_refused(method: str, path: str, status: int) -> None:
    async with running_recorder() as rec, running_router([rec.url]) as router:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(router.url.rsplit(":")[-1]))
        body = b'{"model": "rec-model"}'
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        response = await reader.read()
        writer.close()
        head, _, answer = response.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == str(status).encode(), head
        assert_openai_error(answer)
        assert rec.requests == []


async def test_absolute_form_request_target_never_leaves_the_fleet() -> None:
    async with running_recorder() as rec, running_recorder() as elsewhere:
        async with running_router([rec.url]) as router:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", int(router.url.rsplit(":")[-1])
            )
            body = b'{"model": "rec-model"}'
            writer.write(
                f"POST {elsewhere.url}/v1/completions HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await reader.read()
            writer.close()
        assert elsewhere.requests == []
        assert [r.path_qs for r in rec.requests] == ["/v1/completions"]


async def test_headers_request_id_and_query_are_forwarded_cleanly() -> None:
    async with running_recorder() as rec, running_router([rec.url]) as router:
        rec.headers = {
            "Content-Type": "application/x-custom",
            "X-Upstream": "yes",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "drop-me",
        }
        rec.status = 201
        status, headers, body = await post_raw(
            f"{router.url}/v1/some/route?a=1&b=%20",
            b'{"model": "rec-model"}',
            {
                **JSON,
                "X-Request-Id": "req-123",
                "X-Custom": "kept",
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "dropped",
                "Proxy-Authorization": "Basic abc",
                "Accept-Encoding": "gzip",
            },
        )
        assert (status, body) == (201, b'{"ok": true}')
        assert headers["Content-Type"] == "application/x-custom"
        assert headers["X-Upstream"] == "yes"
        assert headers["X-Request-Id"] == "req-123"
        assert "X-Hop" not in headers
        (sent,) = rec.requests
        assert sent.path_qs == "/v1/some/route?a=1&b=%20"
        lowered = {k.lower(): v for k, v in sent.headers.items()}
        assert lowered["x-request-id"] == "req-123"
        assert lowered["x-custom"] == "kept"
        for dropped in ("x-secret-hop", "proxy-authorization", "accept-encoding", "authorization"):
            assert dropped not in lowered, dropped
        assert sent.body == b'{"model": "rec-model"}'


async def test_cookies_pass_between_one_client_and_the_replica_never_to_others() -> None:
    """The router's session serves every client: a cookie one replica set for one client must
    reach that client, and must not be replayed on anybody else's requests."""
    body = b'{"model": "rec-model"}'
    async with running_recorder() as rec:
        # By name, not IP: aiohttp's default cookie jar ignores cookies from IP addresses.
        by_name = rec.url.replace("127.0.0.1", "localhost")
        async with running_router([by_name]) as router:
            rec.headers = {**JSON, "Set-Cookie": "session=alice; Path=/"}
            _, first, _ = await post_raw(f"{router.url}/v1/completions", body, JSON)
            rec.headers = dict(JSON)
            await post_raw(f"{router.url}/v1/completions", body, JSON)
            await post_raw(f"{router.url}/v1/completions", body, {**JSON, "Cookie": "own=bob"})
    assert first["Set-Cookie"] == "session=alice; Path=/"
    sent = [{k.lower(): v for k, v in r.headers.items()}.get("cookie") for r in rec.requests]
    assert sent == [None, None, "own=bob"]


async def test_a_replica_redirect_goes_back_to_the_client_not_followed() -> None:
    """A proxy relays a redirect; following it would re-send the client's body and headers to
    wherever the Location points, outside the fleet."""
    body = b'{"model": "rec-model"}'
    async with (
        running_recorder() as rec,
        running_recorder() as elsewhere,
        running_router([rec.url]) as router,
        aiohttp.ClientSession() as client,
    ):
        rec.status = 307
        rec.headers = {**JSON, "Location": f"{elsewhere.url}/v1/completions"}
        url = f"{router.url}/v1/completions"
        async with client.post(url, data=body, headers=JSON, allow_redirects=False) as response:
            status, location = response.status, response.headers["Location"]
    assert status == 307
    assert location == f"{elsewhere.url}/v1/completions"
    assert len(rec.requests) == 1
    assert elsewhere.requests == []


async def test_a_request_id_is_generated_when_absent_or_unusable(router: RouterHandle) -> None:
    body = b'{"model": "sim-model", "prompt": "x", "max_tokens": 1}'
    _, first, _ = await post_raw(f"{router.url}/v1/completions", body, JSON)
    _, second, _ = await post_raw(
        f"{router.url}/v1/completions", body, {**JSON, "X-Request-Id": "bad id with spaces"}
    )
    _, error, _ = await post_raw(f"{router.url}/v1/completions", b"{", JSON)
    ids = {first["X-Request-Id"], second["X-Request-Id"], error["X-Request-Id"]}
    assert len(ids) == 3
    assert all(len(i) == 32 for i in ids)


async def test_unexpected_errors_become_a_500_without_internals(router: RouterHandle) -> None:
    class Exploding:
        name = "exploding"

        def pick(self, replicas: Sequence[ReplicaState], request: RequestInfo) -> ReplicaState:
            raise RuntimeError("secret internal detail")

    router.ctx.policy = Exploding()
    status, _, body = await post_raw(
        f"{router.url}/v1/completions", b'{"model": "sim-model", "prompt": "x"}', JSON
    )
    assert status == 500
    error = assert_openai_error(body)
    assert "secret" not in error["message"]


async def test_multipart_bodies_are_forwarded_without_parsing() -> None:
    async with running_recorder() as rec, running_router([rec.url]) as router:
        form = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nrec-model\r\n--b--\r\n'
        status, _, _ = await post_raw(
            f"{router.url}/v1/audio/transcriptions",
            form,
            {"Content-Type": "multipart/form-data; boundary=b"},
        )
        assert status == 200
        assert rec.requests[0].body == form


async def test_app_lifecycle_starts_and_stops_loops_and_session(sims: list[SimHandle]) -> None:
    config = RouterConfig(backends=tuple(s.url for s in sims), health_interval_s=0.1)
    app = make_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    ctx = app[ROUTER]
    await eventually(lambda: len(ctx.fleet.healthy()) == 2, what="replicas healthy")
    session = ctx.session
    before = {t.get_name() for t in asyncio.all_tasks()}
    assert {"discovery", "health", "scrape"} <= before
    await runner.cleanup()
    assert session.closed
    after = {t.get_name() for t in asyncio.all_tasks()}
    assert not {"discovery", "health", "scrape"} & after
    with pytest.raises(RuntimeError):
        _ = ctx.session


def test_make_app_rejects_a_bad_dns_name_up_front() -> None:
    with pytest.raises(ConfigError, match="DNS name"):
        make_app(RouterConfig(discover_dns=("not/a/host", 8000)))
