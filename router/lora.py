"""``POST /fleet/lora``: load or unload a LoRA adapter on every replica of a model at once.

vLLM started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` takes adapters at runtime through
``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, one server at a time; a fleet
wants them on all replicas of the base model, and to know which ones failed. The answer lists
every replica's outcome; a replica that took the change serves (or stops serving) the adapter
right away in the router too, without waiting for the next ``/v1/models`` refresh.

The route lives under /fleet/ so it takes the admin keys when the router has them
(vllm_fleet.router.auth): a client key must not change what the fleet serves.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from vllm_fleet.router.bounded_read import read_capped
from vllm_fleet.router.context import ROUTER
from vllm_fleet.router.openai_errors import ApiError
from vllm_fleet.router.state import ReplicaState

#: loading an adapter may download it from the hub first.
LORA_TIMEOUT_S = 120.0
#: vLLM answers a line of text; keep at most this much of it per replica.
MAX_ANSWER_BYTES = 4096
ACTIONS = ("load", "unload")


def _field(body: dict[str, Any], name: str, example: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ApiError(
            400, f'\'{name}\' must be a non-empty string, e.g. "{name}": "{example}".', param=name
        )
    return value.strip()


async def _parse(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object.")
    return body


async def _call(
    session: aiohttp.ClientSession,
    replica: ReplicaState,
    action: str,
    payload: dict[str, str],
    model: str,
) -> dict[str, Any]:
    url = f"{replica.url}/v1/{action}_lora_adapter"
    try:
        async with session.post(
            url,
            json=payload,
            timeout=aiohttp.ClientTimeout(total=LORA_TIMEOUT_S),
            allow_redirects=False,
        ) as resp:
            text = (await read_capped(resp, MAX_ANSWER_BYTES)).decode("utf-8", "replace")
            status = resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        return {"url": replica.url, "ok": False, "status": None, "message": type(exc).__name__}
    message = _message(text)
    ok = status == 200
    if ok:
        name = payload["lora_name"]
        if action == "load":
            replica.models, replica.parents[name] = replica.models | {name}, model
        else:
            replica.models = replica.models - {name}
            replica.parents.pop(name, None)
    return {"url": replica.url, "ok": ok, "status": status, "message": message}


def _message(text: str) -> str:
    """vLLM's errors are JSON (``{"error": {"message"}}``, older ``{"message"}``); its
    successes a plain line."""
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()
    if isinstance(data, dict):
        inner = data.get("error")
        found = inner.get("message") if isinstance(inner, dict) else data.get("message")
        if isinstance(found, str):
            return found
    return text.strip()


async def fleet_lora(request: web.Request) -> web.Response:
    """Load or unload one adapter on every known replica serving ``model``."""
    ctx = request.app[ROUTER]
    body = await _parse(request)
    action = body.get("action")
    if action not in ACTIONS:
        raise ApiError(400, '\'action\' must be "load" or "unload".', param="action")
    name = _field(body, "lora_name", "sql-lora")
    model = _field(body, "model", "meta-llama/Llama-3.1-8B-Instruct")
    payload = {"lora_name": name}
    if action == "load":
        payload["lora_path"] = _field(body, "lora_path", "/adapters/sql-lora")
    replicas = [r for r in ctx.fleet.replicas.values() if model in r.models and model != name]
    if not replicas:
        served = ", ".join(ctx.fleet.served_models()) or "none"
        raise ApiError(
            404,
            f"No replica serves the model `{model}`. Served models: {served}.",
            param="model",
            code="model_not_found",
        )
    results = await asyncio.gather(
        *(_call(ctx.session, r, action, payload, model) for r in replicas)
    )
    done = sum(1 for r in results if r["ok"])
    answer: dict[str, Any] = {
        "object": "fleet.lora",
        "action": action,
        "lora_name": name,
        "model": model,
        "ok": done == len(results),
        "replicas": list(results),
    }
    if done < len(results):
        answer["error"] = {
            "message": f"{action} failed on {len(results) - done} of {len(results)} replicas.",
            "type": "upstream_error",
            "param": None,
            "code": "lora_partial_failure",
        }
    return web.json_response(answer, status=200 if done == len(results) else 502)
