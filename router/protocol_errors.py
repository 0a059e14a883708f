"""OpenAI-style answers for the requests aiohttp answers before the app sees them.

Bytes that do not parse as HTTP/1.1 (a bad request line, CR/LF or NUL in a header, both
Content-Length and Transfer-Encoding) are answered by aiohttp's connection handler, and an
``Expect`` other than ``100-continue`` by aiohttp's expect handler, both before any middleware
runs, both in text/plain. Clients and fuzzers then get the one kind of body in the router that
is not ``{"error": {...}}``. aiohttp has no option for either, so ``RouterRunner`` is the
AppRunner whose connections use ``OpenAIErrorRequestHandler``: aiohttp's handler with the two
methods those answers pass through (``handle_error`` builds the parser's, ``finish_response``
sends every response) turning them into our JSON body. aiohttp still logs parser errors
(vllm_fleet.router.logs makes them one warning line each).

tests/chaos/test_hostile_input.py checks that every answer to the fuzzers is OpenAI-style JSON.
"""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web

from vllm_fleet.router.openai_errors import error_response

#: Messages by status; none echoes the request (it may hold anything, including CR/LF).
_MESSAGES = {
    400: "Bad request: the router could not parse it as HTTP/1.1 (request line, headers or "
    "body framing).",
    417: "Only `Expect: 100-continue` is supported.",
    500: "Internal error in the router.",
}


class OpenAIErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering its own errors with an OpenAI-style body."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # Logs the error, and raises if part of a response was already sent.
        super().handle_error(request, status, exc, message)
        response = _json_error(status)
        response.force_close()
        return response

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # The app's middleware turns every HTTPException into JSON; one that arrives here was
        # raised before it ran (aiohttp's expect handler: 417 for an unknown Expect).
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            resp = _json_error(resp.status, resp.headers.get("Allow"))
        return await super().finish_response(request, resp, start_time)


def _json_error(status: int, allow: str | None = None) -> web.Response:
    text = _MESSAGES.get(status) or f"{status} {HTTPStatus(status).phrase}."
    code = HTTPStatus(status).phrase.lower().replace(" ", "_")
    return error_response(status, text, code=code, headers={"Allow": allow} if allow else None)


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return OpenAIErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class RouterRunner(web.AppRunner):
    """``web.AppRunner`` whose connections use OpenAIErrorRequestHandler."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app builds its own Server (Application._make_handler); swapping the class only
        # changes which handler class each new connection gets.
        server.__class__ = _Server
        return server
