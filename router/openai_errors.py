"""OpenAI-style error bodies, so every client library can show the router's errors.

The official clients parse ``{"error": {"message", "type", "param", "code"}}`` and raise a typed
exception from the HTTP status; anything else (HTML, a traceback, an empty body) surfaces as a
confusing decode error. Every non-proxied error the router sends goes through here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

#: OpenAI's ``type`` field by status; statuses not listed use "server_error" (5xx) or
#: "invalid_request_error" (4xx), which is what OpenAI and vLLM send for those.
ERROR_TYPES: Mapping[int, str] = {
    401: "invalid_request_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
}


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_payload(
    message: str, *, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_json(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> bytes:
    """The serialized body (also used inside an SSE ``data:`` line)."""
    payload = error_payload(message, type_=error_type(status), param=param, code=code)
    return json.dumps(payload, separators=(",", ":")).encode()


class ApiError(Exception):
    """An error meant for the client: raise it anywhere in a handler, the middleware sends it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return error_response(
            self.status, self.message, param=self.param, code=self.code, headers=self.headers
        )


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status,
        body=error_json(status, message, param=param, code=code),
        content_type="application/json",
        headers=headers,
    )


def sse_error_event(status: int, message: str, *, code: str | None = None) -> bytes:
    """An SSE error event followed by the end-of-stream marker.

    Sent when a stream breaks after bytes already reached the client: the stream cannot be
    retried or given a new status, but OpenAI clients raise an APIError on a ``data:`` event
    carrying an ``error`` key, so the failure is visible instead of a silently short answer.
    """
    return b"data: " + error_json(status, message, code=code) + b"\n\ndata: [DONE]\n\n"
