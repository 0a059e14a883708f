"""Run each replica in a Docker container (through the Docker SDK), pinned to its GPUs.

The contract is the process runtime's, so the supervisor cannot tell the two apart: ``start``
creates and starts a container, ``status`` asks the daemon, ``stop`` stops and removes it. The
Docker SDK is blocking (an HTTP request to the daemon per call, every health interval per
replica), so each runtime method runs its SDK calls in a thread (``asyncio.to_thread``) and
the supervisor's loop keeps checking the other replicas meanwhile.

Docker's own restart policy stays off: the supervisor owns restarts (health checks, backoff,
restart budget), and a second restarter would hide crashes from it.

A ``ReplicaSpec`` is translated, never re-planned (``container_config``, a pure function), from
its fields (host, port, model, GPUs), not by parsing its command line:

- GPUs: one device request for exactly ``spec.gpus``; inside the container they are numbered
  from 0, which is why ``CUDA_VISIBLE_DEVICES`` is not passed on.
- Network: the server listens on 0.0.0.0 in its own network namespace (its ``--host
  spec.host`` becomes ``--host 0.0.0.0``) and ``spec.port`` is published on ``spec.host``, the
  address the plan chose (127.0.0.1 by default), so ``spec.url`` holds.
- Command: the host's Python interpreter path becomes the image's ``python3``; a local model
  directory (``spec.model``) is bind-mounted read-only at the same path, so ``--model`` needs
  no rewrite.
- Labels ``vllm-fleet.fleet`` and ``vllm-fleet.replica``: ``remove_fleet_containers`` removes
  exactly the containers of one fleet and nothing else.
- Logs: read from the daemon while the container runs, copied into ``log_path`` before it is
  removed, so a crash can still be read after the supervisor restarted the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
from docker.models.containers import Container

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.plan_types import ReplicaSpec, ServerSpec
from vllm_fleet.launcher.runtime.base import Runtime, ServerHandle, ServerStatus
from vllm_fleet.launcher.runtime.process import HEADER_PREFIX, ProcessRuntime, last_line, rotate_log
from vllm_fleet.launcher.vllm_args import kv_replay_port

LABEL_FLEET = "vllm-fleet.fleet"
LABEL_REPLICA = "vllm-fleet.replica"
#: engine image for replicas with GPUs; the same vLLM release as the CPU image below.
DEFAULT_GPU_IMAGE = "vllm/vllm-openai:v0.32.0"
#: engine image for replicas without GPUs, built by compose/build-images.sh.
DEFAULT_CPU_IMAGE = "vllm-fleet-engine-cpu:0.1.0"
#: host variables handed to every container when set (model downloads need the token).
PASSTHROUGH_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

_PYTHON = re.compile(r"python(\d+(\.\d+)?)?$")
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_LOG_TAIL_LINES = 20


class DockerRuntimeError(OSError):
    """The daemon refused or failed a request. An ``OSError`` because that is what the
    supervisor treats as "could not start": it retries with backoff instead of crashing."""


@dataclass(frozen=True)
class DockerSettings:
    #: every container of the fleet carries ``vllm-fleet.fleet=<fleet>``.
    fleet: str
    gpu_image: str = DEFAULT_GPU_IMAGE
    cpu_image: str = DEFAULT_CPU_IMAGE
    #: /dev/shm size: vLLM's processes exchange requests (and NCCL tensors) through it.
    shm_size: str = "2g"
    #: extra mounts, "HOST:CONTAINER[:ro]" as in ``docker run -v`` (e.g. a Hugging Face cache).
    volumes: tuple[str, ...] = ()
    #: vLLM binds CPU memory to NUMA nodes (mbind), which Docker's seccomp profile allows only
    #: with SYS_NICE.
    cap_add: tuple[str, ...] = ("SYS_NICE",)


@dataclass(frozen=True)
class ContainerConfig:
    """Everything ``docker run`` gets for one replica; plain data, built without the daemon."""

    name: str
    image: str
    #: full argv, given as the entrypoint so the image's own entrypoint cannot interfere.
    entrypoint: tuple[str, ...]
    environment: dict[str, str]
    labels: dict[str, str]
    #: container port -> (host address, host port).
    ports: dict[str, tuple[str, int]]
    #: GPU indices for the nvidia device request; empty for CPU replicas.
    device_ids: tuple[str, ...]
    #: (host path, container path, read only).
    binds: tuple[tuple[str, str, bool], ...] = ()
    volumes: tuple[str, ...] = ()
    shm_size: str = "2g"
    cap_add: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def create_kwargs(self) -> dict[str, Any]:
        """Arguments of ``client.containers.create`` (the SDK objects are made only here)."""
        kwargs: dict[str, Any] = {
            "image": self.image,
            "name": self.name,
            "entrypoint": list(self.entrypoint),
            "command": [],
            "environment": dict(self.environment),
            "labels": dict(self.labels),
            "ports": dict(self.ports),
            "init": True,
            "shm_size": self.shm_size,
            "restart_policy": {"Name": "no"},
            "volumes": [f"{src}:{dst}:{'ro' if ro else 'rw'}" for src, dst, ro in self.binds]
            + list(self.volumes),
            **self.extra,
        }
        if self.cap_add:
            kwargs["cap_add"] = list(self.cap_add)
        if self.device_ids:
            kwargs["device_requests"] = [
                docker.types.DeviceRequest(
                    driver="nvidia", device_ids=list(self.device_ids), capabilities=[["gpu"]]
                )
            ]
        return kwargs


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise ConfigError(
            f"{what} {value!r}: use letters, digits, '.', '_' and '-' (a Docker container name)"
        )
    return value


def container_name(fleet: str, replica: str) -> str:
    return f"vllm-fleet-{fleet}-{replica}"


def fleet_name_for(run_dir: Path) -> str:
    """A stable fleet name per run directory: two checkouts never share (or remove) containers."""
    resolved = run_dir.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-zA-Z0-9_.-]", "-", resolved.parent.name).strip("-._")[:24] or "fleet"
    return f"{stem}-{digest}"


def container_config(
    spec: ServerSpec,
    settings: DockerSettings,
    host_env: Mapping[str, str] | None = None,
    is_dir: Callable[[str], bool] = os.path.isdir,
) -> ContainerConfig:
    """Translate one replica spec into a container: same argv, same port, same GPUs."""
    if not spec.command:
        raise ConfigError(f"replica {spec.name}: empty command")
    argv = listen_everywhere(spec.command, spec.host)
    if _PYTHON.match(Path(argv[0]).name):
        argv[0] = "python3"
    paths = [spec.model, *spec.lora_paths] if isinstance(spec, ReplicaSpec) else []
    # a local model or adapter directory is mounted at the same path, read-only.
    binds = [(p, p, True) for p in dict.fromkeys(paths) if p.startswith("/") and is_dir(p)]
    environment = {"PYTHONUNBUFFERED": "1"}
    env = host_env if host_env is not None else {}
    environment.update({k: env[k] for k in PASSTHROUGH_ENV if env.get(k)})
    environment.update(spec.env)
    environment.pop("CUDA_VISIBLE_DEVICES", None)
    return ContainerConfig(
        name=container_name(check_name(settings.fleet, "fleet"), check_name(spec.name, "replica")),
        image=settings.gpu_image if spec.gpus else settings.cpu_image,
        entrypoint=tuple(argv),
        environment=environment,
        labels={LABEL_FLEET: settings.fleet, LABEL_REPLICA: spec.name},
        ports=published_ports(spec),
        device_ids=tuple(str(g) for g in spec.gpus),
        binds=tuple(binds),
        volumes=settings.volumes,
        shm_size=settings.shm_size,
        cap_add=settings.cap_add,
    )


def published_ports(spec: ServerSpec) -> dict[str, tuple[str, int]]:
    """The server's port and, for a replica publishing KV events, those ports (events and
    replay) too, all on ``spec.host`` (the router subscribes to the events from the host)."""
    ports = {f"{spec.port}/tcp": (spec.host, spec.port)}
    if isinstance(spec, ReplicaSpec) and spec.kv_events_port is not None:
        for port in (spec.kv_events_port, kv_replay_port(spec.kv_events_port)):
            ports[f"{port}/tcp"] = (spec.host, port)
    return ports


def listen_everywhere(command: Sequence[str], host: str) -> list[str]:
    """``command`` with the server's ``--host HOST`` (or ``--host=HOST``) changed to 0.0.0.0.

    In its container the server must listen on every interface for the published port to
    reach it; ``host`` (the spec's field) is where the port is published instead. Only the
    pair the spec names is rewritten: the command line is not parsed for anything else.
    """
    argv = list(command)
    for i, arg in enumerate(argv):
        if arg == f"--host={host}":
            argv[i] = "--host=0.0.0.0"
        elif arg == "--host" and i + 1 < len(argv) and argv[i + 1] == host:
            argv[i + 1] = "0.0.0.0"
    return argv


def _runtime_unreachable(exc: Exception) -> str:
    return (
        f"--runtime docker: cannot reach the Docker daemon ({exc}); start dockerd (and "
        "check DOCKER_HOST), or use --runtime process"
    )


def docker_client(
    unreachable: Callable[[Exception], str] = _runtime_unreachable,
) -> docker.DockerClient:
    """A client to a daemon that answers; ConfigError(unreachable(exc)) when none does."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise ConfigError(unreachable(exc)) from None
    return client


class DockerRuntime:
    """One container per replica; see the module docstring for the translation."""

    def __init__(
        self,
        settings: DockerSettings,
        log_dir: Path,
        client: docker.DockerClient | None = None,
        log_backups: int = 3,
    ) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.log_backups = log_backups
        self.client = client if client is not None else docker_client()
        self._containers: dict[str, Container] = {}

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def check_images(self, specs: Iterable[ReplicaSpec]) -> None:
        """Before anything starts: every image these replicas need is present locally."""
        needed = sorted({container_config(s, self.settings).image for s in specs})
        missing = []
        for image in needed:
            try:
                self.client.images.get(image)
            except docker.errors.ImageNotFound:
                missing.append(image)
            except docker.errors.DockerException as exc:
                raise ConfigError(f"--runtime docker: cannot list images ({exc})") from None
        if missing:
            raise ConfigError(
                f"--runtime docker: image {', '.join(missing)} not found locally; "
                + "; ".join(_image_hint(image) for image in missing)
            )

    async def start(self, spec: ServerSpec) -> ServerHandle:
        return await asyncio.to_thread(self._start_blocking, spec)

    def _start_blocking(self, spec: ServerSpec) -> ServerHandle:
        config = container_config(spec, self.settings, host_env=os.environ)
        self._remove_stale(config.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_path(spec.name)
        rotate_log(path, self.log_backups)
        path.write_text(
            f"{HEADER_PREFIX} {spec.name}: docker container {config.name} ({config.image}): "
            f"{' '.join(config.entrypoint)}\n"
            f"# live output: docker logs -f {config.name}; copied here when it is removed\n",
            encoding="utf-8",
        )
        try:
            # create + start, never an implicit pull: pulling a multi-GB engine image here would
            # stall the supervisor; check_images tells the user up front instead.
            container = self.client.containers.create(**config.create_kwargs())
        except docker.errors.ImageNotFound:
            hint = _image_hint(config.image)
            raise DockerRuntimeError(f"image {config.image} not found; {hint}") from None
        except docker.errors.DockerException as exc:
            raise DockerRuntimeError(f"docker create {config.name}: {exc}") from None
        try:
            container.start()
            container.reload()
        except docker.errors.DockerException as exc:
            # e.g. the host port is taken: the supervisor gets no handle, so nothing may remain.
            self._save_logs(container, path)
            with contextlib.suppress(docker.errors.DockerException):
                container.remove(force=True)
            raise DockerRuntimeError(f"docker start {config.name}: {exc}") from None
        self._containers[spec.name] = container
        return ServerHandle(
            spec=spec, container=config.name, log_path=path, started_at=time.monotonic()
        )

    async def status(self, handle: ServerHandle) -> ServerStatus:
        return await asyncio.to_thread(self._status_blocking, handle)

    def _status_blocking(self, handle: ServerHandle) -> ServerStatus:
        container = self._containers.get(handle.spec.name)
        if container is None:
            return ServerStatus(running=False)
        try:
            container.reload()
        except docker.errors.NotFound:
            return ServerStatus(running=False)
        except docker.errors.DockerException:
            # A daemon hiccup is not a crash: the health checks decide whether it still serves.
            return ServerStatus(running=True)
        state = container.attrs.get("State", {})
        if state.get("Running"):
            return ServerStatus(running=True)
        return ServerStatus(running=False, returncode=_exit_code(state))

    async def stop(self, handle: ServerHandle, timeout: float) -> ServerStatus:
        return await asyncio.to_thread(self._stop_blocking, handle, timeout)

    def _stop_blocking(self, handle: ServerHandle, timeout: float) -> ServerStatus:
        container = self._containers.get(handle.spec.name)
        if container is None:
            return ServerStatus(running=False)
        code: int | None = None
        # NotFound: already gone; other API errors (e.g. 409, not running): the removal below
        # settles it either way.
        with contextlib.suppress(docker.errors.APIError):
            if timeout <= 0:
                container.kill()
            else:
                # SIGTERM, then SIGKILL after the grace period (the daemon counts in seconds).
                container.stop(timeout=max(1, math.ceil(timeout)))
        with contextlib.suppress(docker.errors.DockerException):
            container.reload()
            code = _exit_code(container.attrs.get("State", {}))
        self._save_logs(container, handle.log_path)
        self._remove(container)
        if self._containers.get(handle.spec.name) is container:
            del self._containers[handle.spec.name]
        return ServerStatus(running=False, returncode=code)

    async def last_log_line(self, handle: ServerHandle) -> str:
        return await asyncio.to_thread(self._last_log_line_blocking, handle)

    def _last_log_line_blocking(self, handle: ServerHandle) -> str:
        container = self._containers.get(handle.spec.name)
        if container is None:
            return last_line(handle.log_path)
        try:
            raw: bytes = container.logs(tail=_LOG_TAIL_LINES)
        except docker.errors.DockerException:
            return ""
        return last_clean_line(raw.decode("utf-8", errors="replace"))

    def _save_logs(self, container: Container, path: Path) -> None:
        try:
            raw: bytes = container.logs()
        except docker.errors.DockerException:
            return
        with open(path, "ab") as log:
            log.write(raw)

    def _remove(self, container: Container) -> None:
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: removal already in progress
                raise DockerRuntimeError(f"docker rm {container.name}: {exc}") from None

    def _remove_stale(self, name: str) -> None:
        """A container left by a crashed supervisor holds the name and the port: remove it,
        but only when it is ours (labelled with this fleet)."""
        try:
            old = self.client.containers.get(name)
        except docker.errors.NotFound:
            return
        except docker.errors.DockerException as exc:
            raise DockerRuntimeError(f"docker inspect {name}: {exc}") from None
        if old.labels.get(LABEL_FLEET) != self.settings.fleet:
            raise DockerRuntimeError(
                f"a container named {name} exists but does not belong to fleet "
                f"{self.settings.fleet}; remove it (docker rm -f {name})"
            )
        self._remove(old)


def _image_hint(image: str) -> str:
    if image.startswith("vllm-fleet-"):
        return f"build it with `bash compose/build-images.sh` ({image})"
    return f"pull it first: `docker pull {image}`"


def _exit_code(state: Mapping[str, Any]) -> int | None:
    code = state.get("ExitCode")
    return int(code) if isinstance(code, int) else None


def last_clean_line(text: str) -> str:
    for line in reversed(re.split(r"[\r\n]+", text)):
        clean = _ANSI.sub("", line).strip()
        if clean:
            return clean
    return ""


def fleet_containers(client: docker.DockerClient, fleet: str) -> list[Container]:
    """Every container (running or not) labelled with this fleet."""
    found: list[Container] = client.containers.list(
        all=True, filters={"label": f"{LABEL_FLEET}={fleet}"}
    )
    return found


def remove_fleet_containers(
    fleet: str, client: docker.DockerClient | None = None, timeout: float = 10.0
) -> list[str]:
    """Stop and remove exactly the containers labelled with ``fleet``; returns their names.

    For ``vllm-fleet down``: after the supervisor stopped its replicas this finds nothing, after
    a crashed supervisor it cleans up what was left.
    """
    client = client if client is not None else docker_client()
    removed = []
    for container in fleet_containers(client, fleet):
        with contextlib.suppress(docker.errors.APIError):
            container.stop(timeout=max(1, math.ceil(timeout)))
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
        removed.append(str(container.name))
    return removed


class SplitRuntime:
    """The replicas in containers, every other server (the router) a host process, behind one
    ``Runtime``.

    The router reads the run directory's backends file and reaches the replicas on the host's
    published ports, so it stays a host process while the engines run in containers.
    """

    def __init__(self, containers: Runtime, host: Runtime) -> None:
        self.containers = containers
        self.host = host

    def _for(self, spec: ServerSpec) -> Runtime:
        return self.containers if isinstance(spec, ReplicaSpec) else self.host

    async def start(self, spec: ServerSpec) -> ServerHandle:
        return await self._for(spec).start(spec)

    async def stop(self, handle: ServerHandle, timeout: float) -> ServerStatus:
        return await self._for(handle.spec).stop(handle, timeout)

    async def status(self, handle: ServerHandle) -> ServerStatus:
        return await self._for(handle.spec).status(handle)

    async def last_log_line(self, handle: ServerHandle) -> str:
        return await self._for(handle.spec).last_log_line(handle)


def docker_fleet_runtime(
    run_dir: Path,
    logs_dir: Path,
    environ: Mapping[str, str] | None = None,
    client: docker.DockerClient | None = None,
) -> SplitRuntime:
    """The runtime of ``vllm-fleet up --runtime docker``: engines in containers labelled with
    the run directory's fleet name, the router as a host process.

    Images: VLLM_FLEET_GPU_IMAGE / VLLM_FLEET_CPU_IMAGE (defaults above); extra mounts:
    VLLM_FLEET_DOCKER_VOLUMES, comma-separated "HOST:CONTAINER[:ro]" entries.
    """
    env = os.environ if environ is None else environ
    volumes = tuple(v.strip() for v in env.get("VLLM_FLEET_DOCKER_VOLUMES", "").split(",") if v)
    settings = DockerSettings(
        fleet=fleet_name_for(run_dir),
        gpu_image=env.get("VLLM_FLEET_GPU_IMAGE") or DEFAULT_GPU_IMAGE,
        cpu_image=env.get("VLLM_FLEET_CPU_IMAGE") or DEFAULT_CPU_IMAGE,
        volumes=volumes,
    )
    return SplitRuntime(
        containers=DockerRuntime(settings, logs_dir, client=client),
        host=ProcessRuntime(logs_dir),
    )
