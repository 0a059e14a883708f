"""Where a model's files are, and what they say on disk: the sizing's inputs.

``--model`` names a local directory (as vLLM reads it) or a Hugging Face repo, found in the
local cache or, when the hub answers, fetched there (config.json and the safetensors index
only). The checkpoint's size comes from the index's ``metadata.total_size`` or, without one,
from the safetensors headers; no tensor is read, no torch imported.
``vllm_fleet.launcher.model_size`` turns what this module reads into a ``ModelSize``.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vllm_fleet.launcher.errors import ConfigError

#: safetensors header dtype -> bytes per element.
SAFETENSORS_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


SIZE_HINT = "pass a local model directory as --model, or --params 70B --dtype bf16"


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: 8 bytes little-endian length, then the JSON."""
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) != 8:
            raise ConfigError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 * 1024**2:
            raise ConfigError(f"{path}: safetensors header of {length} bytes is implausible")
        try:
            header: dict[str, Any] = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConfigError(f"{path}: safetensors header is not JSON") from None
    return header


def safetensors_totals(paths: list[Path]) -> tuple[int, int]:
    """(parameters, bytes) over every tensor in the given files."""
    params = 0
    size = 0
    for path in paths:
        for name, info in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            count = math.prod(int(d) for d in info["shape"])
            params += count
            size += count * SAFETENSORS_BYTES.get(str(info["dtype"]).upper(), 2)
    return params, size


def hub_cache_dir(env: Mapping[str, str]) -> Path:
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", "~")) / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def cached_snapshot(model: str, env: Mapping[str, str]) -> Path | None:
    """The snapshot directory of ``org/name`` in the HF cache: refs/main, else the newest."""
    repo = hub_cache_dir(env) / ("models--" + model.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if (snapshot / "config.json").is_file():
            return snapshot
    snapshots = [p for p in (repo / "snapshots").glob("*") if (p / "config.json").is_file()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def check_local_path(model: str) -> None:
    """Refuse a --model written as a filesystem path that is not a directory.

    Hub names are ``org/name`` and never start with "/", "." or "~", so such a name is meant
    as a local directory. Without this, a typo would surface only when vLLM fails to start,
    over and over, while the supervisor restarts it. Only for engines started on this host: a
    container's model path may live in its image.
    """
    if not model.startswith(("/", ".", "~")):
        return
    local = Path(model).expanduser()
    if not local.exists():
        raise ConfigError(
            f"--model {model}: no such directory; give an existing local model directory, "
            "or a Hugging Face name like org/model"
        )
    if not local.is_dir():
        raise ConfigError(f"--model {model}: not a directory; give the model's directory")


def find_model_dir(model: str, env: Mapping[str, str]) -> Path | None:
    """A local directory with config.json: the path itself (as vLLM reads it), else the cache."""
    local = Path(model).expanduser()
    if (local / "config.json").is_file():
        return local
    if local.is_dir():
        raise ConfigError(f"--model {model}: directory has no config.json; {SIZE_HINT}")
    return cached_snapshot(model, env) if "/" in model else None


#: fetches ``config.json`` and the safetensors index of a hub repo into the cache; returns the
#: directory holding them, or None when the hub does not answer.
Fetcher = Callable[[str, Mapping[str, str]], "Path | None"]


def _hub_reachable(env: Mapping[str, str], timeout: float = 2.0) -> bool:
    """One quick TCP connect, because huggingface_hub retries for ~20 s when offline."""
    url = urlparse(env.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def fetch_from_hub(model: str, env: Mapping[str, str]) -> Path | None:
    """Download only config.json (+ the index when the checkpoint is sharded)."""
    if env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or "/" not in model:
        return None
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    if not _hub_reachable(env):
        return None
    try:
        config = Path(hf_hub_download(model, "config.json", cache_dir=hub_cache_dir(env)))
    except Exception:  # gated, missing, network: all mean "cannot size from the hub"
        return None
    # single-file checkpoints have no index; the config alone then estimates the size.
    with contextlib.suppress(Exception):
        hf_hub_download(model, "model.safetensors.index.json", cache_dir=hub_cache_dir(env))
    return config.parent


def _index_total(directory: Path) -> int | None:
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = directory / name
        if path.is_file():
            try:
                total = json.loads(path.read_text())["metadata"]["total_size"]
                return int(total)
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"{path}: no metadata.total_size; {SIZE_HINT}") from None
    return None


def read_checkpoint(directory: Path) -> tuple[int | None, int | None, str]:
    """(exact parameters or None, checkpoint bytes or None, where they came from)."""
    total = _index_total(directory)
    if total is not None:
        return None, total, "model.safetensors.index.json"
    files = sorted(directory.glob("*.safetensors"))
    if files:
        params, size = safetensors_totals(files)
        return params, size, f"{len(files)} safetensors header(s)"
    return None, None, ""


def read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config.json ({exc}); {SIZE_HINT}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config.json is not a JSON object; {SIZE_HINT}")
    return data
