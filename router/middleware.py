"""The outermost middleware: request id, errors as OpenAI JSON, one access-log line, metrics.

Every request passes here exactly once, so this is where the per-request record (Exchange) is
created and, whatever happened inside (a validation error, a failover, a client that went
away, a bug), turned into one log line and one sample of the request metrics.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from vllm_fleet.router.openai_errors import ApiError, error_response
from vllm_fleet.router.telemetry import CLIENT_CLOSED, NO_REPLICA, Telemetry

log = logging.getLogger("vllm_fleet.router")
access_log = logging.getLogger("vllm_fleet.access")

REQUEST_ID = "X-Request-Id"
#: A client's request id is reused only if it is short and plain (it lands in logs verbatim).
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@dataclass(slots=True)
class Exchange:
    """What happened to one request; the proxy fills it in, the middleware reports it."""

    request_id: str
    started: float
    model: str | None = None
    replica: str = NO_REPLICA
    attempts: int = 0
    #: Set by the proxy when the status the client saw differs from the response object's
    #: (a client that disconnected, a stream cut mid-way).
    status: int = 0


_EXCHANGE = web.RequestKey("vllm_fleet.exchange", Exchange)


def exchange_of(request: web.Request) -> Exchange:
    return request[_EXCHANGE]


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID)
    if given and _REQUEST_ID_RE.fullmatch(given):
        return given
    return secrets.token_hex(16)


def _http_exception_response(exc: web.HTTPException) -> web.Response:
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    messages = {
        404: "Not found: the router serves /v1/* (POST, and GET /v1/models), /health, /ready, "
        "/metrics and /fleet/replicas.",
        405: f"Method not allowed; use {exc.headers.get('Allow', 'another method')}.",
        413: "Request body too large: raise the router's --max-body-bytes to accept it.",
    }
    message = messages.get(exc.status, exc.reason)
    return error_response(exc.status, message, headers=headers)


def make_outer_middleware(telemetry: Telemetry) -> Middleware:
    @web.middleware
    async def outer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        exchange = Exchange(_request_id(request), loop.time())
        request[_EXCHANGE] = exchange
        status = 500
        try:
            try:
                response = await handler(request)
            except ApiError as exc:
                response = exc.response()
            except web.HTTPException as exc:
                response = _http_exception_response(exc)
            except Exception:
                log.exception(
                    "unhandled error request_id=%s path=%s", exchange.request_id, request.path
                )
                response = error_response(500, "Internal router error; see the router log.")
            if not response.prepared:
                response.headers[REQUEST_ID] = exchange.request_id
            status = exchange.status or response.status
            return response
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            _report(request, exchange, status, loop.time() - exchange.started, telemetry)

    return outer_middleware


def _report(
    request: web.Request, exchange: Exchange, status: int, elapsed: float, telemetry: Telemetry
) -> None:
    is_api = request.path.startswith("/v1/")
    if is_api:
        telemetry.observe_request(exchange.replica, status, elapsed)
    level = logging.INFO if is_api else logging.DEBUG
    if access_log.isEnabledFor(level):
        fields = {
            "method": request.method,
            "path": request.path,
            "model": exchange.model,
            "replica": exchange.replica,
            "status": status,
            "latency_ms": round(elapsed * 1000.0, 1),
            "attempts": exchange.attempts,
            "request_id": exchange.request_id,
        }
        access_log.log(level, "request", extra={"fields": fields})
