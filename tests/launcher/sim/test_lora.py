"""The simulator's LoRA adapters: listed as models with their parent, served by name, loaded
and unloaded at runtime with vLLM's answers, and `--lora-modules` parsed as vLLM's."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from tests.support.sim import SIM_MODEL, running_sim
from vllm_fleet.launcher.cli import build_parser
from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.sim.cli import config_from_args
from vllm_fleet.launcher.sim.lora import parse_lora_modules


async def call(method: str, url: str, body: object = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.request(method, url, json=body) as resp,
    ):
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def test_adapters_are_listed_served_loaded_and_unloaded() -> None:
    async with running_sim(lora_modules=(("sql", "/a/sql"),)) as sim:
        _, models = await call("GET", f"{sim.url}/v1/models")
        cards = {m["id"]: m for m in models["data"]}
        assert cards["sql"]["parent"] == SIM_MODEL and cards[SIM_MODEL]["parent"] is None
        chat = {"model": "sql", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        status, answer = await call("POST", f"{sim.url}/v1/chat/completions", chat)
        assert status == 200 and answer["model"] == "sql"
        status, _ = await call("POST", f"{sim.url}/v1/chat/completions", {**chat, "model": "no"})
        assert status == 404

        load = {"lora_name": "math", "lora_path": "/a/math"}
        status, text = await call("POST", f"{sim.url}/v1/load_lora_adapter", load)
        assert status == 200 and "added successfully" in text
        status, error = await call("POST", f"{sim.url}/v1/load_lora_adapter", load)
        assert status == 400 and "already been loaded" in error["error"]["message"]
        status, _ = await call(
            "POST", f"{sim.url}/v1/completions", {"model": "math", "prompt": "a"}
        )
        assert status == 200
        unload = {"lora_name": "math"}
        assert (await call("POST", f"{sim.url}/v1/unload_lora_adapter", unload))[0] == 200
        status, error = await call("POST", f"{sim.url}/v1/unload_lora_adapter", unload)
        assert status == 404 and error["error"]["param"] == "lora_name"
        status, error = await call("POST", f"{sim.url}/v1/load_lora_adapter", {"lora_name": "m"})
        assert status == 400


def test_lora_modules_flag_takes_vllms_forms() -> None:
    args = build_parser().parse_args(
        ["sim", "--port", "1", "--model", "m", "--lora-modules", "a=/p/a",
         '{"name": "b", "path": "hub/b"}']
    )  # fmt: skip
    assert config_from_args(args).lora_modules == (("a", "/p/a"), ("b", "hub/b"))
    with pytest.raises(ConfigError, match=r"--lora-modules 'a': use name=path"):
        parse_lora_modules(["a"])
