"""What the client sent: its body (bounded in size and time), what the balancer needs from it,
the path to forward, and the headers that may cross the proxy in each direction.

Hot-path care: the body is parsed once (model, stream, max_tokens, prefix keys) and forwarded
as the original bytes.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from vllm_fleet.router.balancer import RequestInfo
from vllm_fleet.router.bounded_read import read_bounded
from vllm_fleet.router.middleware import REQUEST_ID
from vllm_fleet.router.openai_errors import ApiError
from vllm_fleet.router.prefix_index import request_prefix

#: RFC 9110 hop-by-hop headers: they describe one connection, never the end-to-end message.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Also not forwarded upstream: the client's credentials (replaced by --upstream-api-key), the
#: framing and host of the client's connection, and Accept-Encoding (chunks are relayed as they
#: come, uncompressed, so the stream is never held back by a compressor).
_DROP_UPSTREAM = HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "accept-encoding",
    "expect",
    "x-request-id",
}
_DROP_DOWNSTREAM = HOP_BY_HOP | {"content-length", "date", "server", "x-request-id"}
#: Path under /v1/ that may be forwarded: plain segments, no "." / ".." and no encoded tricks.
_SEGMENT = r"(?!\.\.?(?:/|$))[A-Za-z0-9._~\-]+"
_TAIL_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")

#: Rough bytes per prompt token, to estimate the prompt size without a tokenizer.
BYTES_PER_TOKEN = 4


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, within ``limit`` bytes and ``timeout_s`` seconds (--body-timeout)."""
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    try:
        content = request.content
        if content.is_eof():  # the body came whole with the headers: no wait, no timer
            body = content.read_nowait()  # what request.read() gives, without its loop
            if len(body) > limit:  # a chunked body (no Content-Length) larger than allowed
                raise _too_large(limit)
            return body
        return await read_bounded(request.read(), timeout_s)
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except asyncio.TimeoutError:
        raise ApiError(
            408,
            f"The request body did not arrive within {timeout_s:g} seconds "
            "(the router's --body-timeout).",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"Request body is larger than the router's limit of {limit} bytes "
        "(raise it with --max-body-bytes).",
        code="request_too_large",
    )


def parse_request(body: bytes, content_type: str) -> RequestInfo:
    """What the balancer needs from the body; the body itself is forwarded untouched."""
    return parse_body(body, content_type)[0]


def parse_body(body: bytes, content_type: str) -> tuple[RequestInfo, dict[str, Any] | None]:
    """parse_request's RequestInfo and the parsed JSON object (None for multipart), so that
    what else reads the body (router.continuation) does not parse it again.

    Multipart bodies (audio uploads) are not parsed: they go to any healthy replica.
    """
    prompt_tokens = len(body) // BYTES_PER_TOKEN
    if content_type.startswith("multipart/"):
        return RequestInfo(model=None, prompt_tokens=prompt_tokens), None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, f"We could not parse the JSON body of your request ({exc}).", code="invalid_json"
        ) from None
    except RecursionError:  # "[[[[...": the C decoder recurses once per level
        raise ApiError(
            400, "The JSON body of your request is nested too deeply.", code="invalid_json"
        ) from None
    if not isinstance(payload, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(
            400, "You must provide a model parameter (a non-empty string).", param="model"
        )
    max_tokens = payload.get("max_tokens", payload.get("max_completion_tokens"))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        max_tokens = None
    info = RequestInfo(
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        stream=payload.get("stream") is True,
        prefix=request_prefix(model, payload),
    )
    return info, payload


def forward_path(request: web.Request) -> str:
    """``/v1/<tail>[?query]`` to send upstream; anything but plain path segments is a 404."""
    tail = request.match_info["tail"]
    if not _TAIL_RE.fullmatch(tail):
        raise ApiError(404, f"Unknown API path {request.path!r}.", code="not_found")
    query = request.rel_url.raw_query_string
    return f"/v1/{tail}?{query}" if query else f"/v1/{tail}"


def _drop_set(base: frozenset[str], headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """``base`` plus the extra hop-by-hop names listed in the Connection header (RFC 9110
    section 7.6.1). Most messages have none beyond ``base``: then ``base`` itself, no new set."""
    value = headers.get("Connection")
    if not value:
        return base
    tokens = {t.strip().lower() for t in value.split(",")}
    tokens.discard("")
    return base if tokens <= base else base | tokens


def _filtered(
    headers: CIMultiDictProxy[str], drop: frozenset[str], request_id: str
) -> CIMultiDict[str]:
    kept: CIMultiDict[str] = CIMultiDict(
        [(name, value) for name, value in headers.items() if name.lower() not in drop]
    )
    kept.add(REQUEST_ID, request_id)  # any X-Request-Id was dropped: add, not replace
    return kept


def upstream_headers(incoming: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    """The client's end-to-end headers minus its credentials; --upstream-api-key, when set, is
    added by the session (vllm_fleet.router.app.upstream_session)."""
    return _filtered(incoming, _drop_set(_DROP_UPSTREAM, incoming), request_id)


def downstream_headers(upstream: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    return _filtered(upstream, _drop_set(_DROP_DOWNSTREAM, upstream), request_id)
