"""Helpers for the tests that run real Docker: preconditions, compose projects, polling.

Docker is a precondition of these tests, never a reason to skip them: without a daemon, the
compose plugin or the images they FAIL, naming the command that provides what is missing
(`.ci/docker-setup` does all of it).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
import pytest
from docker.models.containers import Container

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO_ROOT / "compose"
#: the documented sample settings; passing it keeps a developer's compose/.env out of the tests.
SAMPLE_ENV = COMPOSE_DIR / ".env.example"
TAG = "0.1.0"
ROUTER_IMAGE = f"vllm-fleet-router:{TAG}"
ENGINE_CPU_IMAGE = f"vllm-fleet-engine-cpu:{TAG}"
SETUP_HINT = (
    "run `bash .ci/docker-setup` (installs docker.io and compose, starts dockerd, "
    "builds the images)"
)
#: what the CPU engine image serves by default.
TINY_MODEL = "tiny-llama"
#: a vLLM CPU replica takes ~30-150 s to become healthy on 2 busy cores.
ENGINE_READY_S = 420.0

T = TypeVar("T")


def docker_client() -> docker.DockerClient:
    if shutil.which("docker") is None:
        pytest.fail(f"the docker CLI is not installed: {SETUP_HINT}")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"the Docker daemon is not reachable ({exc}): {SETUP_HINT}")
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        pytest.fail(f"`docker compose` (v2) is missing ({probe.stderr.strip()}): {SETUP_HINT}")
    return client


def require_images(client: docker.DockerClient, *images: str) -> None:
    for image in images:
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            pytest.fail(f"image {image} is missing: run `bash compose/build-images.sh`")


def unique_name(prefix: str) -> str:
    """Unique per test run, so parallel runs and leftovers of a crashed run never collide."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


def poll(probe: Callable[[], T | None], what: str, deadline_s: float, interval_s: float = 0.5) -> T:
    """Call ``probe`` until it returns something other than None (or False); fail at the
    deadline naming ``what``."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s:g}s waiting for {what}")
        time.sleep(interval_s)


@dataclass(frozen=True)
class ComposeProject:
    """One `docker compose` project: a unique name, its files and environment."""

    name: str
    files: tuple[Path, ...]
    env_files: tuple[Path, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def command(self, *args: str) -> list[str]:
        argv = ["docker", "compose", "-p", self.name]
        for env_file in self.env_files:
            argv += ["--env-file", str(env_file)]
        for file in self.files:
            argv += ["-f", str(file)]
        return [*argv, *args]

    def run(self, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        """Run a compose command; on failure the assertion shows compose's own output."""
        env = {**os.environ, **dict(self.env)}
        result = subprocess.run(
            self.command(*args), capture_output=True, text=True, env=env, timeout=timeout,
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise AssertionError(
                f"`{' '.join(self.command(*args))}` failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def config(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run("config", "--format", "json").stdout)
        return data

    def containers(
        self, client: docker.DockerClient, service: str | None = None
    ) -> list[Container]:
        labels = [f"com.docker.compose.project={self.name}"]
        if service is not None:
            labels.append(f"com.docker.compose.service={service}")
        found: list[Container] = client.containers.list(all=True, filters={"label": labels})
        return found

    def logs(self) -> str:
        result = subprocess.run(
            self.command("logs", "--no-color", "--tail", "40"),
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        return result.stdout + result.stderr


def leftovers(client: docker.DockerClient, project: str) -> list[str]:
    """Containers, networks and volumes compose created for ``project`` that still exist."""
    label = f"com.docker.compose.project={project}"
    names = [
        f"container {c.name}" for c in client.containers.list(all=True, filters={"label": label})
    ]
    names += [f"network {n.name}" for n in client.networks.list(filters={"label": label})]
    names += [f"volume {v.name}" for v in client.volumes.list(filters={"label": label})]
    return names


@contextmanager
def compose_up(
    project: ComposeProject, client: docker.DockerClient, up_args: Sequence[str] = ()
) -> Iterator[ComposeProject]:
    """`up -d --wait` the project, always `down -v` it afterwards (even when `up` failed)."""
    try:
        try:
            project.run("up", "-d", "--wait", *up_args, timeout=ENGINE_READY_S + 120)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- logs ---\n{project.logs()}") from None
        yield project
    finally:
        # The project's environment too: without its COMPOSE_PROFILES, `down` would leave the
        # services of those profiles running.
        subprocess.run(
            project.command("down", "-v", "--remove-orphans", "--timeout", "5"),
            capture_output=True, check=False, timeout=180, env={**os.environ, **dict(project.env)},
        )  # fmt: skip


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def container_ip(container: Container) -> str:
    container.reload()
    networks: dict[str, Any] = container.attrs["NetworkSettings"]["Networks"]
    return str(next(iter(networks.values()))["IPAddress"])


def crash(container: Container) -> None:
    """SIGKILL the container's init from the host: to Docker this is a crash (like an OOM kill),
    so the restart policy applies. `docker kill` would not do: Docker counts it as a manual stop
    and suspends the restart policy (see docker-kill(1))."""
    container.reload()
    pid = int(container.attrs["State"]["Pid"])
    assert pid > 0, f"{container.name} is not running"
    os.kill(pid, signal.SIGKILL)
