"""The floor proxies of the data-path harness (bench.floor_proxies) relay real answers: a
figure measured through them is a proxy's cost, not a broken one's."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from bench.floor_proxies import KINDS, FloorPeer, main
from bench.replicas import SimFleet
from bench.scenarios.s5_overhead import INSTANT


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[SimFleet]:
    sims = SimFleet.of([INSTANT, INSTANT], tmp_path / "fleet", sys.executable)
    await sims.start()
    try:
        yield sims
    finally:
        sims.stop()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_floor_proxy_relays_plain_and_streamed_answers_over_both_replicas(
    kind: str, fleet: SimFleet, tmp_path: Path
) -> None:
    peer = FloorPeer(tmp_path / kind, kind)
    url = await peer.start(fleet.urls)
    try:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none") as client:
            models = await client.models.list()
            model = models.data[0].id
            for _ in range(2):  # round robin: one request to each replica
                plain = await client.completions.create(model=model, prompt="hi", max_tokens=5)
                assert plain.usage is not None and plain.usage.completion_tokens == 5
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=7,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 7
    finally:
        peer.stop()


def test_a_wrong_command_line_gets_its_usage_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nginx", "8000", "http://127.0.0.1:1"]) == 2
    assert "usage: python -m bench.floor_proxies httptools|aiohttp|" in capsys.readouterr().err
