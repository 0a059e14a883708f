"""Runtimes turn a ``ReplicaSpec`` into a running server (processes now, containers later)."""

from launcher.runtime.base import ReplicaHandle, ReplicaStatus, Runtime

__all__ = ["ReplicaHandle", "ReplicaStatus", "Runtime"]
