"""Where backend URLs come from: a static list, a file that may change, or a DNS name.

Every source answers one question, "which base URLs now?", and the discovery loop makes the
Fleet equal to the union of the answers. Sources never raise for a bad refresh: they keep
their last good answer and log once, because dropping every backend over a typo or a DNS blip
turns a small mistake into an outage, while a stale backend costs little (the health checker
ejects it if it is really gone).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import yaml

from vllm_fleet.router.errors import ConfigError
from vllm_fleet.router.state import Fleet

log = logging.getLogger("vllm_fleet.router")

#: A backends file is a short list of URLs; refuse to parse anything huge.
MAX_FILE_BYTES = 1 << 20

#: (host, port) -> IP address strings. The default wraps loop.getaddrinfo; tests inject one.
Resolver = Callable[[str, int], Awaitable[list[str]]]


class Discovery(Protocol):
    """A source of backend base URLs (validated, normalised: no trailing slash)."""

    async def urls(self) -> list[str]: ...


def validate_backend_url(url: str) -> str:
    """Return ``url`` normalised (lower-case scheme, no trailing slash) or raise ConfigError.

    Only ``http(s)://HOST[:PORT]`` with an optional trailing slash is accepted: the router
    appends /v1/..., /health and /metrics itself, so a path prefix, query or credentials would
    be silently mangled.
    """
    hint = "use http://HOST:PORT, e.g. http://127.0.0.1:8001"
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"backend URL {url!r} is empty; {hint}")
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"backend URL {url!r} is malformed ({exc}); {hint}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(f"backend URL {url!r} must start with http:// or https://; {hint}")
    if any(c.isspace() for c in text):
        raise ConfigError(f"backend URL {url!r} contains whitespace; {hint}")
    if not parts.hostname:
        raise ConfigError(f"backend URL {url!r} has no host; {hint}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"backend URL {url!r} must not contain credentials; {hint}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in text or "#" in text:
        raise ConfigError(f"backend URL {url!r} must not have a path or query; {hint}")
    if port == 0:
        raise ConfigError(f"backend URL {url!r} has port 0; {hint}")
    # Rebuilt from parts so equal backends compare equal: host lower-cased, no empty port.
    host = parts.hostname  # lower-cased by urlsplit, IPv6 without brackets
    netloc = f"[{host}]" if ":" in host else host
    return f"{scheme}://{netloc}" if port is None else f"{scheme}://{netloc}:{port}"


def url_for_address(address: str, port: int, scheme: str = "http") -> str:
    """``http://ADDR:PORT`` for an IP address, with IPv6 in brackets (zone id escaped)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{scheme}://{address}:{port}"
    if ip.version == 6:
        return f"{scheme}://[{address.replace('%', '%25')}]:{port}"
    return f"{scheme}://{address}:{port}"


class StaticDiscovery:
    """Fixed URLs from --backend flags; validated once, at construction (startup errors)."""

    def __init__(self, urls: Sequence[str]) -> None:
        self._urls = list(dict.fromkeys(validate_backend_url(u) for u in urls))

    async def urls(self) -> list[str]:
        return list(self._urls)

    def __repr__(self) -> str:
        return f"StaticDiscovery({self._urls!r})"


def parse_backends_document(text: str) -> list[str]:
    """Backend URLs from YAML/JSON text: a list of URLs, or a mapping with a ``backends`` list.

    Raises ConfigError when the shape or any URL is wrong: a file is applied whole or not at all.
    """
    try:
        doc: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML/JSON: {exc}".replace("\n", " ")) from None
    if isinstance(doc, dict):
        if "backends" not in doc:
            raise ConfigError("mapping has no 'backends' key; write backends: [http://HOST:PORT]")
        doc = doc["backends"]
    if doc is None:
        return []
    if not isinstance(doc, list) or not all(isinstance(u, str) for u in doc):
        raise ConfigError("expected a list of URL strings, e.g. [http://127.0.0.1:8001]")
    return list(dict.fromkeys(validate_backend_url(u) for u in doc))


class FileDiscovery:
    """URLs from a YAML or JSON file, re-read whenever its mtime, size or inode changes.

    A missing or invalid file keeps the last good list (empty before the first good read) and
    logs one warning per distinct problem; the next good read logs the recovery. Editors that
    write a new file and rename it over the old one are caught by the inode.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._urls: list[str] = []
        self._problem = ""

    def __repr__(self) -> str:
        return f"FileDiscovery({str(self.path)!r})"

    def _warn(self, problem: str) -> None:
        if problem != self._problem:
            log.warning(
                "backends file unusable, keeping last good list path=%s problem=%s kept=%d",
                self.path,
                problem,
                len(self._urls),
            )
        self._problem = problem

    async def urls(self) -> list[str]:
        try:
            st = self.path.stat()
        except OSError as exc:
            self._stamp = None
            self._warn(f"cannot stat: {exc.strerror or exc}")
            return list(self._urls)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return list(self._urls)
        self._stamp = stamp
        try:
            if st.st_size > MAX_FILE_BYTES:
                raise ConfigError(f"file is {st.st_size} bytes, over the {MAX_FILE_BYTES} cap")
            text = self.path.read_text(encoding="utf-8")
            urls = parse_backends_document(text)
        except (OSError, UnicodeDecodeError) as exc:
            self._warn(f"cannot read: {exc}")
            return list(self._urls)
        except ConfigError as exc:
            self._warn(str(exc))
            return list(self._urls)
        if self._problem:
            log.info("backends file usable again path=%s backends=%d", self.path, len(urls))
            self._problem = ""
        self._urls = urls
        return list(urls)


async def getaddrinfo_resolver(host: str, port: int) -> list[str]:
    """Every TCP address of ``host`` via the event loop's (threaded) getaddrinfo."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class DnsDiscovery:
    """One URL per address of a DNS name (e.g. a Kubernetes headless service), re-resolved on
    every call.

    A failed or empty resolution keeps the last good list and logs once: getaddrinfo cannot tell
    "no replicas" from "resolver hiccup", and the health checker ejects stale addresses anyway.
    """

    def __init__(
        self, name: str, port: int, resolver: Resolver | None = None, *, scheme: str = "http"
    ) -> None:
        if not name or "/" in name or (":" in name and not _is_ipv6(name)):
            raise ConfigError(f"DNS name {name!r} must be a bare host name, e.g. vllm.default.svc")
        if not 0 < port < 65536:
            raise ConfigError(f"DNS port {port} must be between 1 and 65535")
        if scheme not in ("http", "https"):
            raise ConfigError(f"DNS scheme {scheme!r} must be http or https")
        self.name = name
        self.port = port
        self.scheme = scheme
        self._resolve: Resolver = resolver if resolver is not None else getaddrinfo_resolver
        self._urls: list[str] = []
        self._failing = False

    def __repr__(self) -> str:
        return f"DnsDiscovery({self.name!r}, {self.port})"

    async def urls(self) -> list[str]:
        try:
            addresses = await self._resolve(self.name, self.port)
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            return self._keep(f"resolution failed: {exc}")
        urls = sorted({url_for_address(a, self.port, self.scheme) for a in addresses})
        if not urls:
            return self._keep("resolved to no addresses")
        if self._failing:
            log.info("dns discovery recovered name=%s backends=%d", self.name, len(urls))
            self._failing = False
        self._urls = urls
        return list(urls)

    def _keep(self, problem: str) -> list[str]:
        if not self._failing:
            log.warning(
                "dns discovery keeping last good list name=%s problem=%s kept=%d",
                self.name,
                problem,
                len(self._urls),
            )
        self._failing = True
        return list(self._urls)


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


async def refresh_once(fleet: Fleet, sources: Sequence[Discovery]) -> None:
    """Make the fleet equal to the union of all sources' URLs; log what changed.

    If a source raises (sources should not), nothing changes this round: applying the union of
    the others would drop every backend of the failing source.
    """
    wanted: list[str] = []
    for source in sources:
        try:
            wanted.extend(await source.urls())
        except Exception:
            log.exception("discovery source failed, fleet unchanged source=%r", source)
            return
    added, removed = fleet.set_backends(wanted)
    for url in added:
        log.info("backend added url=%s", url)
    for url in removed:
        log.info("backend removed url=%s", url)


async def discovery_loop(
    fleet: Fleet, sources: Sequence[Discovery], *, interval_s: float = 2.0
) -> None:
    """Refresh the fleet from ``sources`` every ``interval_s`` forever; cancel to stop."""
    while True:
        await refresh_once(fleet, sources)
        await asyncio.sleep(interval_s)
