"""Client authentication: ``Authorization: Bearer <key>`` against a fixed set of keys.

Only the API (/v1/*) and the fleet view (/fleet/*, it lists backend URLs) are protected;
/health, /ready and /metrics stay open because probes and Prometheus scrapers seldom carry
tokens. The keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from router.openai_errors import ApiError

PROTECTED_PREFIXES = ("/v1/", "/fleet/")


def bearer_token(header: str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode()


def key_matches(token: bytes, keys: Iterable[bytes]) -> bool:
    """Compare against every key without stopping early, so timing tells nothing."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key)
    return matched


def make_auth_middleware(api_keys: Iterable[str]) -> Middleware:
    keys = tuple(k.encode() for k in api_keys)

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(PROTECTED_PREFIXES):
            token = bearer_token(request.headers.get("Authorization"))
            if token is None:
                raise ApiError(
                    401,
                    "Missing API key: send 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if not key_matches(token, keys):
                raise ApiError(
                    401,
                    "Incorrect API key provided.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return auth_middleware
