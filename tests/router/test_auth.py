"""Client API keys: Bearer tokens checked in constant time, never forwarded, never logged."""

from __future__ import annotations

import json
import logging

import openai
import pytest

from tests.support.router import get_json, post_raw, running_recorder, running_router
from tests.support.sim import SIM_MODEL, SimHandle
from vllm_fleet.router.auth import bearer_token, key_matches

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", b"abc"),
        ("bearer  abc ", b"abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: bytes | None) -> None:
    assert bearer_token(header) == token


def test_key_matches_any_of_several() -> None:
    keys = [b"k1", b"k2"]
    assert key_matches(b"k2", keys)
    assert not key_matches(b"k3", keys)
    assert not key_matches(b"k", keys)
    assert not key_matches(b"k1", [])


async def test_openai_client_with_right_wrong_and_missing_keys(sims: list[SimHandle]) -> None:
    async with running_router([s.url for s in sims], api_keys=("k1", "k2")) as router:
        for key in ("k1", "k2"):
            async with router.openai(api_key=key) as client:
                result = await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1)
                assert result.choices
        async with router.openai(api_key="wrong") as client:
            with pytest.raises(openai.AuthenticationError):
                await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1)
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()
        status, _, body = await post_raw(
            f"{router.url}/v1/completions", b'{"model": "sim-model", "prompt": "x"}'
        )
        assert status == 401
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
        assert sum(router.served().values()) == 2


async def test_probes_and_metrics_stay_open_but_the_fleet_view_does_not(
    sims: list[SimHandle],
) -> None:
    async with running_router([s.url for s in sims], api_keys=("k1",)) as router:
        for path in ("/health", "/ready"):
            status, _ = await get_json(f"{router.url}{path}")
            assert status == 200, path
        status, _ = await get_json(f"{router.url}/fleet/replicas")
        assert status == 401
        status, rows = await get_json(
            f"{router.url}/fleet/replicas", {"Authorization": "Bearer k1"}
        )
        assert status == 200 and len(rows) == 2


async def test_client_key_is_replaced_by_the_upstream_key() -> None:
    async with running_recorder() as rec:
        async with running_router(
            [rec.url], api_keys=("client-key",), upstream_api_key="replica-key"
        ) as router:
            status, _, _ = await post_raw(
                f"{router.url}/v1/completions",
                b'{"model": "rec-model"}',
                {"Authorization": "Bearer client-key", "Content-Type": "application/json"},
            )
        assert status == 200
        (sent,) = rec.requests
        assert sent.headers["Authorization"] == "Bearer replica-key"
        assert rec.model_list_headers  # health checks list the models with the key too
        assert all(h["Authorization"] == "Bearer replica-key" for h in rec.model_list_headers)


async def test_client_key_is_not_forwarded_without_an_upstream_key() -> None:
    async with running_recorder() as rec, running_router([rec.url]) as router:
        await post_raw(
            f"{router.url}/v1/completions",
            b'{"model": "rec-model"}',
            {"Authorization": "Bearer sk-client", "Content-Type": "application/json"},
        )
        assert "Authorization" not in rec.requests[0].headers


async def test_keys_never_reach_the_logs(
    sims: list[SimHandle], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_router(
        [s.url for s in sims], api_keys=("sk-very-secret",), upstream_api_key="up-very-secret"
    ) as router:
        async with router.openai(api_key="sk-very-secret") as client:
            await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1)
        async with router.openai(api_key="sk-wrong-secret") as client:
            with pytest.raises(openai.AuthenticationError):
                await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=1)
    text = "\n".join(r.getMessage() + str(getattr(r, "fields", "")) for r in caplog.records)
    assert "request" in text
    assert "secret" not in text
