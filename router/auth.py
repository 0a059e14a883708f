"""Client authentication: ``Authorization: Bearer <key>`` against a fixed set of keys.

The API (/v1/*) and the fleet view (/fleet/*, it lists backend URLs) take the client keys;
/health and /ready stay open for probes, and /metrics stays open because Prometheus scrapers
seldom carry tokens. With admin keys (--admin-api-key), /fleet/* and /metrics take those
instead, so a client key cannot see the fleet's internal addresses. The keys are compared in
constant time and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from vllm_fleet.router.openai_errors import ApiError

PROTECTED_PREFIXES = ("/v1/", "/fleet/")
ADMIN_PREFIXES = ("/fleet/", "/metrics")


def bearer_token(header: str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    # aiohttp decodes header bytes that are not UTF-8 as surrogates; give them back as bytes
    # (a wrong key, so a 401) instead of failing to encode them (a 500).
    return token.strip().encode("utf-8", "surrogateescape")


def key_matches(token: bytes, keys: Iterable[bytes]) -> bool:
    """Compare against every key without stopping early, so timing tells nothing."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key)
    return matched


def _required_keys(
    path: str, keys: tuple[bytes, ...], admin_keys: tuple[bytes, ...]
) -> tuple[bytes, ...]:
    """The keys that may open ``path``; empty when it is open to anyone."""
    if admin_keys and (path.startswith(ADMIN_PREFIXES[0]) or path == ADMIN_PREFIXES[1]):
        return admin_keys
    if path.startswith(PROTECTED_PREFIXES):
        return keys
    return ()


def make_auth_middleware(api_keys: Iterable[str], admin_keys: Iterable[str] = ()) -> Middleware:
    keys = tuple(k.encode() for k in api_keys)
    admin = tuple(k.encode() for k in admin_keys)

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        required = _required_keys(request.path, keys, admin)
        if required:
            token = bearer_token(request.headers.get("Authorization"))
            if token is None:
                raise ApiError(
                    401,
                    "Missing API key: send 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if not key_matches(token, required):
                raise ApiError(
                    401,
                    "Incorrect API key provided.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return auth_middleware
