"""LoRA adapters through the router, on simulators that serve them as vLLM does: a request
naming an adapter reaches only replicas that serve it, and ``POST /fleet/lora`` loads or
unloads one on every replica of a model, reporting each (admin key when the router has one)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from tests.support.router import RouterHandle, running_router
from tests.support.sim import SIM_MODEL, SimHandle, running_sim

SQL = (("sql", "/adapters/sql"),)


@pytest.fixture
async def sims() -> AsyncIterator[list[SimHandle]]:
    """Three replicas of one base model; the first two also serve the `sql` adapter."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(running_sim(lora_modules=lora))
            for lora in (SQL, SQL, ())
        ]


@pytest.fixture
async def router(sims: list[SimHandle]) -> AsyncIterator[RouterHandle]:
    async with running_router([s.url for s in sims]) as handle:
        yield handle


async def call(
    method: str, url: str, body: object = None, key: str | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.request(method, url, json=body, headers=headers) as resp,
    ):
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


async def chat(router: RouterHandle, model: str) -> tuple[int, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return await call("POST", f"{router.url}/v1/chat/completions", body)


def received(sim: SimHandle) -> int:
    return sim.engine.stats.received


async def test_adapter_requests_reach_only_the_replicas_serving_it(
    router: RouterHandle, sims: list[SimHandle]
) -> None:
    status, models = await call("GET", f"{router.url}/v1/models")
    assert status == 200
    assert {m["id"]: m.get("parent") for m in models["data"]} == {SIM_MODEL: None, "sql": SIM_MODEL}
    for _ in range(8):
        status, answer = await chat(router, "sql")
        assert status == 200 and answer["model"] == "sql"
    assert received(sims[0]) + received(sims[1]) == 8 and received(sims[2]) == 0
    assert (await chat(router, SIM_MODEL))[0] == 200
    # the base model may still go anywhere (which one the policy picks is its business).
    assert {r.url for r in router.fleet.candidates(SIM_MODEL)} == {s.url for s in sims}
    assert {r.url for r in router.fleet.candidates("sql")} == {sims[0].url, sims[1].url}


async def test_fleet_lora_loads_and_unloads_on_every_replica(
    router: RouterHandle, sims: list[SimHandle]
) -> None:
    url = f"{router.url}/fleet/lora"
    load = {
        "action": "load",
        "lora_name": "math",
        "lora_path": "/adapters/math",
        "model": SIM_MODEL,
    }
    status, answer = await call("POST", url, load)
    assert status == 200 and answer["ok"] is True
    assert sorted(r["url"] for r in answer["replicas"]) == sorted(s.url for s in sims)
    assert all(r["status"] == 200 and "added" in r["message"] for r in answer["replicas"])
    # the router serves it at once (no wait for the /v1/models refresh), on all three.
    for _ in range(6):
        assert (await chat(router, "math"))[0] == 200
    _, card = await call("GET", f"{router.url}/v1/models/math")
    assert card["parent"] == SIM_MODEL
    assert {r.url for r in router.fleet.candidates("math")} == {s.url for s in sims}
    _, sim_models = await call("GET", f"{sims[2].url}/v1/models")
    card = next(m for m in sim_models["data"] if m["id"] == "math")
    assert card["parent"] == SIM_MODEL and card["root"] == "/adapters/math"

    unload = {"action": "unload", "lora_name": "math", "model": SIM_MODEL}
    status, answer = await call("POST", url, unload)
    assert status == 200 and all("removed" in r["message"] for r in answer["replicas"])
    status, error = await chat(router, "math")
    assert status == 404 and error["error"]["code"] == "model_not_found"


async def test_fleet_lora_reports_each_replica_when_some_fail(router: RouterHandle) -> None:
    load = {"action": "load", "lora_name": "sql", "lora_path": "/adapters/sql", "model": SIM_MODEL}
    status, answer = await call("POST", f"{router.url}/fleet/lora", load)
    assert status == 502 and answer["ok"] is False
    assert answer["error"]["code"] == "lora_partial_failure"
    outcomes = sorted((r["ok"], r["status"]) for r in answer["replicas"])
    assert outcomes == [(False, 400), (False, 400), (True, 200)]  # two had it already
    assert any("already been loaded" in r["message"] for r in answer["replicas"])


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"action": "reload", "lora_name": "a", "model": SIM_MODEL}, 400, "action"),
        ({"action": "load", "lora_name": "a", "model": SIM_MODEL}, 400, "lora_path"),
        ({"action": "unload", "lora_name": "", "model": SIM_MODEL}, 400, "lora_name"),
        ({"action": "unload", "lora_name": "a"}, 400, "model"),
        ({"action": "unload", "lora_name": "a", "model": "nope"}, 404, "model"),
        ([1, 2], 400, None),
    ],
)
async def test_fleet_lora_bad_input_is_an_openai_error(
    router: RouterHandle, body: object, status: int, param: str | None
) -> None:
    got, answer = await call("POST", f"{router.url}/fleet/lora", body)
    assert got == status
    assert answer["error"]["param"] == param and answer["error"]["message"]


async def test_fleet_lora_takes_the_admin_key(sims: list[SimHandle]) -> None:
    unload = {"action": "unload", "lora_name": "sql", "model": SIM_MODEL}
    async with running_router(
        [s.url for s in sims], api_keys=("client",), admin_api_keys=("admin",)
    ) as router:
        url = f"{router.url}/fleet/lora"
        assert (await call("POST", url, unload))[0] == 401
        assert (await call("POST", url, unload, key="client"))[0] == 401
        status, answer = await call("POST", url, unload, key="admin")
        assert status == 502  # the third replica never had it: reported, not hidden
        assert sum(r["ok"] for r in answer["replicas"]) == 2
