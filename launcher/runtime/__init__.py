"""Runtimes turn a ``ServerSpec`` into a running server: a host process group or a container."""

from vllm_fleet.launcher.runtime.base import Runtime, ServerHandle, ServerStatus

__all__ = ["Runtime", "ServerHandle", "ServerStatus"]
