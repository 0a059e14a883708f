"""Find the GPUs this launcher may use, or read the ones the user declares.

The I/O edge of planning: NVML first (exact memory, NVLink peers, NUMA node), ``nvidia-smi`` when
NVML cannot load, nothing when neither answers (the CPU engine then runs). Declared inventories
(``8x80GB``, ``4xA100-40GB``, a YAML file) let anyone plan for hardware they do not sit at.
Indices are always the physical ones NVML / nvidia-smi use, because the launcher pins each
replica with its own ``CUDA_VISIBLE_DEVICES`` and that variable speaks physical indices.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import os
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.plan_types import GIB, Gpu, Inventory

#: memory of GPUs users name without a size, as NVIDIA labels it ("80GB" taken as GiB: an
#: A100-80GB reports 81920 MiB). Names with two sizes (A100, V100) must carry the size.
KNOWN_GPUS: dict[str, int] = {
    "A100-40GB": 40,
    "A100-80GB": 80,
    "A800": 80,
    "H100": 80,
    "H100-80GB": 80,
    "H100-NVL": 94,
    "H800": 80,
    "H200": 141,
    "H20": 96,
    "GH200": 96,
    "B200": 180,
    "B100": 180,
    "L40S": 48,
    "L40": 48,
    "L4": 24,
    "A40": 48,
    "A30": 24,
    "A10": 24,
    "A10G": 24,
    "A6000": 48,
    "RTX-A6000": 48,
    "RTX-6000-ADA": 48,
    "RTX-4090": 24,
    "RTX-3090": 24,
    "T4": 16,
    "V100-16GB": 16,
    "V100-32GB": 32,
}
_AMBIGUOUS = {"A100": ("A100-40GB", "A100-80GB"), "V100": ("V100-16GB", "V100-32GB")}

#: runs an argv and returns its stdout; raises OSError / CalledProcessError / TimeoutExpired.
Runner = Callable[[Sequence[str]], str]

SMI_QUERY = (
    "nvidia-smi",
    "--query-gpu=index,name,memory.total,pci.bus_id,uuid",
    "--format=csv,noheader,nounits",
)
SMI_TOPO = ("nvidia-smi", "topo", "-m")

_ENTRY = re.compile(r"^\s*(?:(\d+)\s*[x*\u00d7]\s*)?(.+?)\s*$", re.IGNORECASE)
_SIZE = re.compile(r"^(?:(.*?)[-_ ]?)?(\d+(?:\.\d+)?)\s*(?:GB|GIB|G)$", re.IGNORECASE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --------------------------------------------------------------------------- declared


def _normal_name(name: str) -> str:
    name = re.sub(r"^NVIDIA\s+", "", name.strip(), flags=re.IGNORECASE)
    return re.sub(r"[\s_]+", "-", name).upper()


def _declared_kind(text: str, where: str) -> tuple[str, int]:
    """(name, memory bytes) of one declared GPU kind: ``80GB``, ``A100-40GB``, ``H200``."""
    key = _normal_name(text)
    if key in KNOWN_GPUS:
        return key, KNOWN_GPUS[key] * GIB
    if key in _AMBIGUOUS:
        options = " or ".join(_AMBIGUOUS[key])
        raise ConfigError(f"{where}: {text!r} comes in several sizes; write {options}")
    sized = _SIZE.match(key)
    if sized:
        memory = float(sized.group(2))
        if memory <= 0:
            raise ConfigError(f"{where}: GPU memory in {text!r} must be positive, e.g. 80GB")
        label = f"{sized.group(1)}-{sized.group(2)}GB" if sized.group(1) else f"{sized.group(2)}GB"
        return label, int(memory * GIB)
    known = ", ".join(sorted(KNOWN_GPUS))
    raise ConfigError(
        f"{where}: unknown GPU {text!r}; give its memory (e.g. 4x48GB or 4x{key}-48GB) "
        f"or use a known name ({known})"
    )


def parse_declared(spec: str, where: str = "--gpus") -> Inventory:
    """``8x80GB``, ``4xA100-40GB``, ``2xH200``, ``4xA100-80GB+4xA100-40GB``; ``none`` = no GPU."""
    if spec.strip().lower() in ("none", "cpu", "0"):
        return Inventory(gpus=(), source="declared")
    gpus: list[Gpu] = []
    for part in re.split(r"[+,]", spec):
        match = _ENTRY.match(part)
        if not part.strip() or match is None:
            raise ConfigError(f"{where}: empty entry in {spec!r}; write e.g. 8x80GB or 4xA100-40GB")
        count = int(match.group(1)) if match.group(1) else 1
        if count < 1:
            raise ConfigError(f"{where}: GPU count in {part.strip()!r} must be at least 1")
        name, memory = _declared_kind(match.group(2), where)
        gpus += [Gpu(index=len(gpus) + i, name=name, memory_bytes=memory) for i in range(count)]
    return Inventory(gpus=tuple(gpus), source="declared")


_FILE_KEYS = {"count", "type", "name", "memory_gb", "numa_node", "pci_bus_id", "nvlink_peers"}
_FILE_KEYS |= {"index", "nvlink"}


def _file_entry(entry: object, at: str, first_index: int) -> list[Gpu]:
    if isinstance(entry, str):
        return [replace(g, index=first_index + g.index) for g in parse_declared(entry, at).gpus]
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{at}: expected a mapping like {{count: 4, type: A100-80GB}}")
    unknown = sorted(set(entry) - _FILE_KEYS)
    if unknown:
        raise ConfigError(
            f"{at}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(_FILE_KEYS))}"
        )
    kind = entry.get("type", entry.get("name"))
    try:
        count = int(entry.get("count", 1))
        if "memory_gb" in entry:
            name = str(kind or f"{entry['memory_gb']}GB")
            memory = int(float(entry["memory_gb"]) * GIB)
        elif kind:
            name, memory = _declared_kind(str(kind), at)
        else:
            raise ConfigError(f"{at}: give type (e.g. A100-80GB) or memory_gb (e.g. 80)")
        numa = int(entry.get("numa_node", -1))
        start = int(entry.get("index", first_index))
        peers = frozenset(int(p) for p in entry.get("nvlink_peers", ()))
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(
            f"{at}: count, memory_gb, numa_node, index and nvlink_peers must be numbers"
        ) from None
    if count < 1 or memory <= 0:
        raise ConfigError(f"{at}: count and memory must be positive")
    indices = range(start, start + count)
    linked = bool(entry.get("nvlink", False))
    return [
        Gpu(
            index=i,
            name=name,
            memory_bytes=memory,
            numa_node=numa,
            pci_bus_id=str(entry.get("pci_bus_id", "")) if count == 1 else "",
            nvlink_peers=(peers | frozenset(indices) - {i}) if linked else peers,
        )
        for i in indices
    ]


def load_inventory_file(path: str | Path) -> Inventory:
    """A YAML file: ``gpus:`` followed by a list of ``{count, type | memory_gb, numa_node,
    nvlink}`` or per-GPU ``{index, name, memory_gb, numa_node, pci_bus_id, nvlink_peers}``
    entries (plain strings like ``4xA100-80GB`` work too)."""
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--gpus {source}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError:
        raise ConfigError(f"--gpus {source}: not valid YAML; see docs/planning.md") from None
    if isinstance(data, Mapping):
        data = data.get("gpus")
    if isinstance(data, str):
        return parse_declared(data, f"{source}: gpus")
    if not isinstance(data, list):
        raise ConfigError(f"{source}: expected 'gpus:' with a list of entries, e.g. - 8xA100-80GB")
    gpus: list[Gpu] = []
    for n, entry in enumerate(data):
        gpus += _file_entry(entry, f"{source}: gpus[{n}]", len(gpus))
    indices = [g.index for g in gpus]
    if len(set(indices)) != len(indices):
        raise ConfigError(f"{source}: GPU indices repeat ({indices}); give each GPU its own index")
    return Inventory(gpus=tuple(gpus), source="declared")


# --------------------------------------------------------------------------- detection


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def sysfs_numa_node(pci_bus_id: str) -> int:
    """NUMA node of a PCI device from sysfs (-1 when unknown): NVML reports it only on new
    drivers, and nvidia-smi topo only on some."""
    parts = pci_bus_id.lower().split(":")
    if len(parts) != 3:
        return -1
    domain = parts[0][-4:].rjust(4, "0")
    try:
        path = Path("/sys/bus/pci/devices") / f"{domain}:{parts[1]}:{parts[2]}" / "numa_node"
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return -1


def gpus_from_nvml(nvml: Any, numa_of: Callable[[str], int] = sysfs_numa_node) -> list[Gpu]:
    """All GPUs NVML sees; raises ``nvml.NVMLError`` when NVML cannot initialise."""
    nvml.nvmlInit()
    try:
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        gpus = []
        for i, handle in enumerate(handles):
            bus_id = _text(nvml.nvmlDeviceGetPciInfo(handle).busId)
            try:
                numa = int(nvml.nvmlDeviceGetNumaNodeId(handle))
            except Exception:  # old driver or binding: the call is optional
                numa = numa_of(bus_id)
            peers = set()
            for j, other in enumerate(handles):
                if j == i:
                    continue
                with contextlib.suppress(Exception):
                    status = nvml.nvmlDeviceGetP2PStatus(
                        handle, other, nvml.NVML_P2P_CAPS_INDEX_NVLINK
                    )
                    if status == nvml.NVML_P2P_STATUS_OK:
                        peers.add(j)
            gpus.append(
                Gpu(
                    index=i,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                    numa_node=numa,
                    pci_bus_id=bus_id,
                    nvlink_peers=frozenset(peers),
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                )
            )
        return gpus
    finally:
        nvml.nvmlShutdown()


def parse_smi_csv(text: str, numa_of: Callable[[str], int] = sysfs_numa_node) -> list[Gpu]:
    """Rows of ``index, name, memory.total [MiB], pci.bus_id[, uuid]``."""
    gpus = []
    for row in csv.reader(text.splitlines(), skipinitialspace=True):
        if not row or not row[0].strip():
            continue
        try:
            index, name, memory_mib, bus_id = (c.strip() for c in row[:4])
            gpus.append(
                Gpu(
                    index=int(index),
                    name=name,
                    memory_bytes=int(float(memory_mib)) * 1024**2,
                    numa_node=numa_of(bus_id),
                    pci_bus_id=bus_id,
                    uuid=row[4].strip() if len(row) > 4 else "",
                )
            )
        except ValueError:
            raise ConfigError(
                f"nvidia-smi printed an unexpected GPU row {','.join(row)!r}; "
                "declare the GPUs with --gpus (e.g. 8x80GB)"
            ) from None
    return gpus


def parse_smi_topology(text: str) -> dict[int, tuple[frozenset[int], int]]:
    """``nvidia-smi topo -m`` -> {gpu: (NVLink peers, NUMA node or -1)}; {} when unparseable."""
    lines = [_ANSI.sub("", line).rstrip() for line in text.splitlines()]
    header: list[str] | None = None
    result: dict[int, tuple[frozenset[int], int]] = {}
    for line in lines:
        cells = [c.strip() for c in line.split("\t")]
        if header is None:
            if "GPU0" in cells and not line.startswith("GPU"):
                header = cells
            continue
        row = re.match(r"^GPU(\d+)$", cells[0]) if cells else None
        if row is None:
            if result:
                break
            continue
        peers = set()
        numa = -1
        for name, value in zip(header[1:], cells[1:], strict=False):
            column = re.match(r"^GPU(\d+)$", name)
            if column and value.upper().startswith("NV"):
                peers.add(int(column.group(1)))
            elif name == "NUMA Affinity" and value.isdigit():
                numa = int(value)
        result[int(row.group(1))] = (frozenset(peers), numa)
    return result


def _run(argv: Sequence[str]) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=15, check=True)
    return done.stdout


def gpus_from_smi(run: Runner, numa_of: Callable[[str], int] = sysfs_numa_node) -> list[Gpu]:
    gpus = parse_smi_csv(run(SMI_QUERY), numa_of)
    try:
        topology = parse_smi_topology(run(SMI_TOPO))
    except (OSError, subprocess.SubprocessError):
        topology = {}
    merged = []
    for gpu in gpus:
        peers, numa = topology.get(gpu.index, (frozenset(), -1))
        merged.append(
            replace(gpu, nvlink_peers=peers, numa_node=gpu.numa_node if numa < 0 else numa)
        )
    return merged


def apply_visible_devices(inventory: Inventory, value: str | None) -> Inventory:
    """Keep only the GPUs ``CUDA_VISIBLE_DEVICES`` exposes, the way CUDA reads it: indices or
    ``GPU-`` UUID prefixes, comma separated, stopping at the first entry that names no GPU."""
    if value is None:
        return inventory
    kept: list[Gpu] = []
    note = ""
    for token in (t.strip() for t in value.split(",")):
        found = None
        if token.isdigit():
            found = next((g for g in inventory.gpus if g.index == int(token)), None)
        elif token.startswith("GPU-"):
            found = next((g for g in inventory.gpus if g.uuid and g.uuid.startswith(token)), None)
        if found is None:
            if token:
                note = f"; {token!r} names no GPU, so CUDA ignores it and everything after it"
            break
        if found not in kept:
            kept.append(found)
    shown = ",".join(str(g.index) for g in kept) or "none"
    notes = (
        *inventory.notes,
        f"CUDA_VISIBLE_DEVICES={value!r}: using GPUs {shown} of {len(inventory.gpus)}{note}",
    )
    return Inventory(gpus=tuple(kept), source=inventory.source, notes=notes)


def _load_nvml() -> ModuleType | None:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


def detect_inventory(
    env: Mapping[str, str] | None = None,
    load_nvml: Callable[[], Any] = _load_nvml,
    run: Runner = _run,
    numa_of: Callable[[str], int] = sysfs_numa_node,
) -> Inventory:
    """NVML, then nvidia-smi, then no GPU; honours ``CUDA_VISIBLE_DEVICES`` from ``env``.

    ``load_nvml`` returns the pynvml module (or a stand-in), None when it is not installed.
    """
    env = os.environ if env is None else env
    nvml = load_nvml()
    notes: list[str] = []
    if nvml is not None:
        try:
            gpus = gpus_from_nvml(nvml, numa_of)
            inventory = Inventory(gpus=tuple(gpus), source="nvml")
            return apply_visible_devices(inventory, env.get("CUDA_VISIBLE_DEVICES"))
        except Exception as exc:  # any NVML failure: fall back to the command line tool
            notes.append(f"NVML unavailable ({exc})")
    try:
        gpus = gpus_from_smi(run, numa_of)
    except (OSError, subprocess.SubprocessError) as exc:
        notes.append(f"nvidia-smi unavailable ({type(exc).__name__})")
        return Inventory(gpus=(), source="none", notes=tuple(notes))
    inventory = Inventory(gpus=tuple(gpus), source="nvidia-smi", notes=tuple(notes))
    if not gpus:
        return Inventory(gpus=(), source="none", notes=tuple(notes))
    return apply_visible_devices(inventory, env.get("CUDA_VISIBLE_DEVICES"))


def resolve_inventory(
    spec: str | Sequence[str] | None, detect: Callable[[], Inventory] = detect_inventory
) -> Inventory:
    """What ``--gpus`` / fleet.yaml ``gpus:`` mean: nothing -> detect, a path -> YAML file,
    a string -> declared (``8x80GB``), a list -> one declared entry each."""
    if spec is None:
        return detect()
    if isinstance(spec, str):
        path = Path(spec)
        if path.suffix.lower() in (".yaml", ".yml") or path.is_file():
            return load_inventory_file(path)
        return parse_declared(spec)
    gpus: list[Gpu] = []
    for entry in spec:
        gpus += [replace(g, index=len(gpus) + g.index) for g in parse_declared(entry).gpus]
    return Inventory(gpus=tuple(gpus), source="declared")
