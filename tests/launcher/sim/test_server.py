"""The simulator seen through the official openai client and plain HTTP, as a router sees it."""

from __future__ import annotations

from openai import AsyncOpenAI

from tests.support.sim import SIM_MODEL, running_sim


async def test_completion_honours_max_tokens_and_reports_usage() -> None:
    async with running_sim() as sim:
        client = AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x")
        result = await client.completions.create(model=SIM_MODEL, prompt="hello", max_tokens=7)
        await client.close()
    assert result.usage is not None
    assert result.usage.completion_tokens == 7
    assert len(result.choices[0].text.split()) == 7
    assert result.choices[0].finish_reason == "length"
