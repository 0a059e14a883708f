"""LoRA adapters in the simulator, as vLLM serves them: each adapter is a model of its own
name in ``/v1/models`` (``parent``: the base model, ``root``: its path), a request naming it is
served (by the base model's engine: an adapter costs the simulator nothing), and with runtime
updating vLLM's ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter`` change the set.

The answers copy vLLM 0.32's: 200 with a plain-text success line, 400 for a missing field or
an adapter loaded twice, 404 for unloading one that is not there.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.sim.config import SimConfig
from vllm_fleet.launcher.sim.protocol import ApiError, bad_request


@dataclass
class LoraAdapters:
    """The adapters one simulated server serves now: name -> path (or hub id)."""

    paths: dict[str, str] = field(default_factory=dict)

    def config_for(self, config: SimConfig, body: object) -> SimConfig:
        """The config a request is parsed with: the adapter's name as the model when the
        request names an adapter, so the model check and the answer's ``model`` say it."""
        model = body.get("model") if isinstance(body, Mapping) else None
        if isinstance(model, str) and model in self.paths:
            return dataclasses.replace(config, model=model)
        return config

    def cards(self, base: str, created: int) -> list[dict[str, Any]]:
        return [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": path,
                "parent": base,
                "max_model_len": None,
                "permission": [],
            }
            for name, path in self.paths.items()
        ]


LORA = web.AppKey("sim_lora", LoraAdapters)


def parse_lora_modules(items: list[str] | None) -> tuple[tuple[str, str], ...]:
    """vLLM's ``--lora-modules name=path ...`` (its JSON form too: {"name":..,"path":..})."""
    found: list[tuple[str, str]] = []
    for item in items or ():
        if item.startswith("{"):
            try:
                data = json.loads(item)
                found.append((str(data["name"]), str(data["path"])))
            except (ValueError, KeyError, TypeError):
                raise ConfigError(
                    f'--lora-modules {item!r}: use name=path or {{"name": .., "path": ..}}'
                ) from None
            continue
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--lora-modules {item!r}: use name=path, e.g. sql=/adapters/sql")
        found.append((name, path))
    return tuple(found)


async def _body(request: web.Request) -> Mapping[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"Invalid JSON body: {exc}") from None
    if not isinstance(body, Mapping):
        raise bad_request("The request body must be a JSON object.")
    return body


def _name(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise bad_request(f"Both 'lora_name' and 'lora_path' must be provided ({key}).", key)
    return value


async def load_lora_adapter(request: web.Request) -> web.Response:
    adapters = request.app[LORA]
    body = await _body(request)
    name, path = _name(body, "lora_name"), _name(body, "lora_path")
    if name in adapters.paths:
        raise bad_request(f"The lora adapter '{name}' has already been loaded.", "lora_name")
    adapters.paths[name] = path
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    adapters = request.app[LORA]
    body = await _body(request)
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise bad_request("'lora_name' needs to be provided to unload a LoRA adapter.", "lora_name")
    if name not in adapters.paths:
        raise ApiError(
            404,
            f"The lora adapter '{name}' cannot be found.",
            err_type="NotFoundError",
            param="lora_name",
        )
    del adapters.paths[name]
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def add_lora(app: web.Application, config: SimConfig) -> None:
    """The adapters of ``--lora-modules`` and the two routes that change them."""
    app[LORA] = LoraAdapters(dict(config.lora_modules))
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
