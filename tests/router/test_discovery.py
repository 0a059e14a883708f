"""Backend URL sources: validation, static lists, a watched file, DNS with a fake resolver."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vllm_fleet.router.discovery import (
    Discovery,
    DnsDiscovery,
    FileDiscovery,
    StaticDiscovery,
    discovery_loop,
    refresh_once,
    url_for_address,
    validate_backend_url,
)
from vllm_fleet.router.errors import ConfigError
from vllm_fleet.router.state import Fleet

DEADLINE_S = 10.0


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("http://127.0.0.1:8001", "http://127.0.0.1:8001"),
        ("http://127.0.0.1:8001/", "http://127.0.0.1:8001"),
        ("HTTPS://vllm-0.internal", "https://vllm-0.internal"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("  http://host:9000  ", "http://host:9000"),
        ("http://VLLM-0.Internal:8000", "http://vllm-0.internal:8000"),
        ("http://host:", "http://host"),
        ("http://[FD00::1]:80/", "http://[fd00::1]:80"),
    ],
)
def test_validate_backend_url_accepts(raw: str, normalised: str) -> None:
    assert validate_backend_url(raw) == normalised


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "127.0.0.1:8001",
        "ftp://host:21",
        "http://",
        "http://:8000",
        "http://host:8000/v1",
        "http://host:8000/?x=1",
        "http://host:8000#frag",
        "http://host:8000#",
        "http://host:8000?",
        "http://ho st:8000",
        "http://user:pw@host:8000",
        "http://host:99999",
        "http://host:0",
        "http://host:port",
    ],
)
def test_validate_backend_url_rejects_naming_the_value(raw: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_backend_url(raw)
    assert repr(raw) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("10.0.0.5", "http://10.0.0.5:8000"),
        ("fd00::5", "http://[fd00::5]:8000"),
        ("fe80::1%eth0", "http://[fe80::1%25eth0]:8000"),
    ],
)
def test_url_for_address_brackets_ipv6(address: str, url: str) -> None:
    assert url_for_address(address, 8000) == url


async def test_static_discovery_validates_and_dedupes() -> None:
    source = StaticDiscovery(["http://a:1/", "http://b:2", "http://a:1"])
    assert await source.urls() == ["http://a:1", "http://b:2"]
    with pytest.raises(ConfigError):
        StaticDiscovery(["http://a:1/v1"])


# --- FileDiscovery -----------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    """Write ``text`` and move the mtime forward so the change is visible on coarse clocks."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    st = path.stat()
    if st.st_mtime_ns <= old:
        os.utime(path, ns=(st.st_atime_ns, old + 1_000_000))


async def wait_for_urls(source: Discovery, expected: list[str]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while (got := await source.urls()) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"urls() is {got}, expected {expected}")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("- http://a:1\n- http://b:2/\n", id="yaml-list"),
        pytest.param("backends:\n  - http://a:1\n  - http://b:2\n", id="yaml-mapping"),
        pytest.param(json.dumps(["http://a:1", "http://b:2"]), id="json-list"),
        pytest.param(json.dumps({"backends": ["http://a:1", "http://b:2"]}), id="json-mapping"),
    ],
)
async def test_file_discovery_formats(tmp_path: Path, text: str) -> None:
    path = tmp_path / "backends.yaml"
    write(path, text)
    assert await FileDiscovery(path).urls() == ["http://a:1", "http://b:2"]


async def test_file_discovery_reloads_on_change(tmp_path: Path) -> None:
    path = tmp_path / "backends.yaml"
    write(path, "- http://a:1\n")
    source = FileDiscovery(path)
    assert await source.urls() == ["http://a:1"]
    write(path, "- http://a:1\n- http://b:2\n")
    await wait_for_urls(source, ["http://a:1", "http://b:2"])
    # atomic replace (new inode), as editors and config managers do
    tmp = tmp_path / "backends.yaml.tmp"
    tmp.write_text("- http://c:3\n")
    os.replace(tmp, path)
    await wait_for_urls(source, ["http://c:3"])
    write(path, "[]")
    await wait_for_urls(source, [])


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("- http://a:1\n  - [unbalanced", id="bad-yaml"),
        pytest.param("- http://a:1/v1\n", id="bad-url"),
        pytest.param("{servers: [http://a:1]}", id="wrong-key"),
        pytest.param("42", id="not-a-list"),
        pytest.param("- 42\n", id="not-strings"),
    ],
)
async def test_file_discovery_keeps_last_good_list_and_warns_once(
    tmp_path: Path, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "backends.yaml"
    write(path, "- http://good:1\n")
    source = FileDiscovery(path)
    assert await source.urls() == ["http://good:1"]
    caplog.set_level(logging.WARNING, logger="vllm_fleet.router")
    write(path, bad)
    for _ in range(3):
        assert await source.urls() == ["http://good:1"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()
    write(path, "- http://better:2\n")
    await wait_for_urls(source, ["http://better:2"])


async def test_file_discovery_missing_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "later.yaml"
    caplog.set_level(logging.WARNING, logger="vllm_fleet.router")
    source = FileDiscovery(path)
    assert await source.urls() == []
    assert await source.urls() == []
    assert len(caplog.records) == 1
    write(path, "- http://a:1\n")
    await wait_for_urls(source, ["http://a:1"])
    path.unlink()
    assert await source.urls() == ["http://a:1"]  # deleted: keep the last good list


# --- DnsDiscovery -------------------------------------------------------------------------------


class FakeResolver:
    """Answers from a mutable table; a missing name raises like getaddrinfo does."""

    def __init__(self) -> None:
        self.table: dict[str, list[str]] = {}
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


async def test_dns_discovery_maps_every_address() -> None:
    resolver = FakeResolver()
    resolver.table["vllm"] = ["10.0.0.2", "10.0.0.1", "fd00::7", "10.0.0.1"]
    source = DnsDiscovery("vllm", 8000, resolver)
    assert await source.urls() == [
        "http://10.0.0.1:8000",
        "http://10.0.0.2:8000",
        "http://[fd00::7]:8000",
    ]
    resolver.table["vllm"] = ["10.0.0.3"]
    assert await source.urls() == ["http://10.0.0.3:8000"]  # re-resolved on every call
    assert resolver.calls == 2


@pytest.mark.parametrize("failure", ["nxdomain", "empty"])
async def test_dns_discovery_keeps_last_good_list(
    failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    resolver = FakeResolver()
    resolver.table["vllm"] = ["10.0.0.1"]
    source = DnsDiscovery("vllm", 8000, resolver)
    assert await source.urls() == ["http://10.0.0.1:8000"]
    if failure == "nxdomain":
        del resolver.table["vllm"]
    else:
        resolver.table["vllm"] = []
    caplog.set_level(logging.WARNING, logger="vllm_fleet.router")
    for _ in range(3):
        assert await source.urls() == ["http://10.0.0.1:8000"]
    assert len(caplog.records) == 1
    resolver.table["vllm"] = ["10.0.0.9"]
    assert await source.urls() == ["http://10.0.0.9:8000"]


async def test_dns_discovery_default_resolver_uses_the_system() -> None:
    source = DnsDiscovery("localhost", 8123)
    urls = await source.urls()
    assert urls and set(urls) <= {"http://127.0.0.1:8123", "http://[::1]:8123"}


@pytest.mark.parametrize(
    ("name", "port"), [("", 80), ("http://vllm", 80), ("vllm", 0), ("vllm", 70000)]
)
def test_dns_discovery_rejects_bad_config(name: str, port: int) -> None:
    with pytest.raises(ConfigError):
        DnsDiscovery(name, port, FakeResolver())


# --- refresh / loop -----------------------------------------------------------------------------


class Broken:
    async def urls(self) -> list[str]:
        raise RuntimeError("bug")


async def test_refresh_once_applies_the_union_and_keeps_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet = Fleet()
    caplog.set_level(logging.INFO, logger="vllm_fleet.router")
    await refresh_once(fleet, [StaticDiscovery(["http://a:1", "http://b:2"])])
    fleet.replicas["http://a:1"].in_flight = 3
    await refresh_once(
        fleet, [StaticDiscovery(["http://a:1"]), StaticDiscovery(["http://c:3", "http://a:1"])]
    )
    assert list(fleet.replicas) == ["http://a:1", "http://c:3"]
    assert fleet.replicas["http://a:1"].in_flight == 3
    messages = [r.getMessage() for r in caplog.records]
    assert "backend added url=http://c:3" in messages
    assert "backend removed url=http://b:2" in messages


async def test_refresh_once_changes_nothing_when_a_source_breaks() -> None:
    fleet = Fleet()
    await refresh_once(fleet, [StaticDiscovery(["http://a:1"])])
    await refresh_once(fleet, [StaticDiscovery(["http://b:2"]), Broken()])
    assert list(fleet.replicas) == ["http://a:1"]


async def test_discovery_loop_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "backends.json"
    write(path, '["http://a:1"]')
    fleet = Fleet()
    task = asyncio.create_task(discovery_loop(fleet, [FileDiscovery(path)], interval_s=0.02))

    async def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            assert time.monotonic() < deadline, f"fleet is {list(fleet.replicas)}"
            await asyncio.sleep(0.01)

    try:
        await until(lambda: list(fleet.replicas) == ["http://a:1"])
        write(path, '["http://b:2", "http://a:1"]')
        await until(lambda: set(fleet.replicas) == {"http://a:1", "http://b:2"})
        write(path, '["http://b:2"]')
        await until(lambda: list(fleet.replicas) == ["http://b:2"])
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
