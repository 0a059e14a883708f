"""`vllm-fleet sim` as a real process: flags, health, kill."""

from __future__ import annotations

import aiohttp
import pytest
from openai import AsyncOpenAI

from tests.support.sim import SIM_MODEL, get_stats, start_sim_process
from vllm_fleet.launcher.cli import main


async def test_process_serves_then_dies_on_kill() -> None:
    async with start_sim_process(max_num_seqs=2, max_model_len=64) as sim:
        client = AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0)
        result = await client.completions.create(model=SIM_MODEL, prompt="x", max_tokens=3)
        models = await client.models.list()
        await client.close()
        assert result.usage is not None
        assert result.usage.completion_tokens == 3
        assert models.data[0].model_dump()["max_model_len"] == 64
        assert (await sim.control(speed=2.0))["speed"] == 2.0
        assert (await get_stats(sim.url))["finished"] == 1
        sim.kill()
        assert sim.process.returncode is not None
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(f"{sim.url}/health")
        sim.kill()


def test_bad_flag_value_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["sim", "--port", "1", "--model", "m", "--speed", "0"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1
    assert "speed" in err
