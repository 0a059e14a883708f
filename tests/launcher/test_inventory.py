"""GPU inventory: declared strings and files, nvidia-smi parsing, NVML, CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.launcher.inventory import (
    SMI_QUERY,
    SMI_TOPO,
    apply_visible_devices,
    detect_inventory,
    load_inventory_file,
    parse_declared,
    parse_smi_csv,
    parse_smi_topology,
    resolve_inventory,
)
from vllm_fleet.launcher.plan_types import GIB, Gpu, Inventory


def kinds(inventory: Inventory) -> list[tuple[int, str, float]]:
    return [(g.index, g.name, g.memory_bytes / GIB) for g in inventory.gpus]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8x80GB", [(i, "80GB", 80.0) for i in range(8)]),
        ("4xA100-40GB", [(i, "A100-40GB", 40.0) for i in range(4)]),
        ("2xH200", [(0, "H200", 141.0), (1, "H200", 141.0)]),
        ("1x24GB", [(0, "24GB", 24.0)]),
        ("L40S", [(0, "L40S", 48.0)]),
        ("2 x h100", [(0, "H100", 80.0), (1, "H100", 80.0)]),
        ("2xRTX-5090-32GB", [(0, "RTX-5090-32GB", 32.0), (1, "RTX-5090-32GB", 32.0)]),
        (
            "2xA100-80GB+1xA100-40GB",
            [(0, "A100-80GB", 80.0), (1, "A100-80GB", 80.0), (2, "A100-40GB", 40.0)],
        ),
        ("none", []),
    ],
)
def test_declared_strings(spec: str, expected: list[tuple[int, str, float]]) -> None:
    inventory = parse_declared(spec)

    assert kinds(inventory) == expected
    assert inventory.source == "declared"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("4xA100", "A100-40GB or A100-80GB"),
        ("2xWhatever", "unknown GPU 'Whatever'"),
        ("0x80GB", "at least 1"),
        ("8x80GB+", "empty entry"),
    ],
)
def test_declared_string_errors(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_declared(spec)

    assert needle in str(caught.value)
    assert str(caught.value).startswith("--gpus")


def test_inventory_file(tmp_path: Path) -> None:
    path = tmp_path / "gpus.yaml"
    path.write_text(
        "gpus:\n"
        "  - {count: 4, type: A100-80GB, numa_node: 0, nvlink: true}\n"
        "  - {count: 2, memory_gb: 40, numa_node: 1}\n"
        "  - {index: 6, name: L4, memory_gb: 24, pci_bus_id: '0000:c1:00.0', nvlink_peers: []}\n"
        "  - 1xH200\n"
    )

    inventory = resolve_inventory(str(path))

    assert kinds(inventory) == [
        (0, "A100-80GB", 80.0), (1, "A100-80GB", 80.0), (2, "A100-80GB", 80.0),
        (3, "A100-80GB", 80.0), (4, "40GB", 40.0), (5, "40GB", 40.0), (6, "L4", 24.0),
        (7, "H200", 141.0),
    ]  # fmt: skip
    assert inventory.gpus[0].nvlink_peers == frozenset({1, 2, 3})
    assert inventory.gpus[4].nvlink_peers == frozenset()
    assert [g.numa_node for g in inventory.gpus] == [0, 0, 0, 0, 1, 1, -1, -1]
    assert inventory.gpus[6].pci_bus_id == "0000:c1:00.0"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("gpus: [{count: 2, type: A100-80GB, colour: red}]", "unknown key 'colour'"),
        ("gpus: [{count: two, memory_gb: 80}]", "must be numbers"),
        ("gpus: [{count: 2}]", "type (e.g. A100-80GB) or memory_gb"),
        ("gpus: [{index: 0, memory_gb: 80}, {index: 0, memory_gb: 80}]", "indices repeat"),
        ("gpus: 12", "expected 'gpus:'"),
        ("gpus: [unclosed", "not valid YAML"),
    ],
)
def test_inventory_file_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "gpus.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError) as caught:
        load_inventory_file(path)

    assert needle in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_inventory_file() -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_inventory("/nonexistent/gpus.yaml")


def test_list_of_declared_entries_renumbers() -> None:
    inventory = resolve_inventory(["2xA100-80GB", "A100-40GB"])

    assert kinds(inventory) == [
        (0, "A100-80GB", 80.0),
        (1, "A100-80GB", 80.0),
        (2, "A100-40GB", 40.0),
    ]


# --------------------------------------------------------------------------- nvidia-smi

SMI_CSV = """\
0, NVIDIA A100-SXM4-80GB, 81920, 00000000:07:00.0, GPU-aaaa-0000
1, NVIDIA A100-SXM4-80GB, 81920, 00000000:0F:00.0, GPU-bbbb-1111
2, NVIDIA A100-SXM4-80GB, 81920, 00000000:47:00.0, GPU-cccc-2222
3, NVIDIA A100-SXM4-80GB, 81920, 00000000:4E:00.0, GPU-dddd-3333
"""

# shape of `nvidia-smi topo -m` on a 4-GPU box with two NVLink pairs and a NIC column.
SMI_TOPO_TEXT = (
    "\t\x1b[4mGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
    "GPU0\t X \tNV12\tSYS\tSYS\tPXB\t0-31,64-95\t0\t\tN/A\n"
    "GPU1\tNV12\t X \tSYS\tSYS\tPXB\t0-31,64-95\t0\t\tN/A\n"
    "GPU2\tSYS\tSYS\t X \tNV12\tSYS\t32-63,96-127\t1\t\tN/A\n"
    "GPU3\tSYS\tSYS\tNV12\t X \tSYS\t32-63,96-127\t1\t\tN/A\n"
    "NIC0\tPXB\tPXB\tSYS\tSYS\t X \t\t\t\t\n"
    "\n"
    "Legend:\n"
    "\n"
    "  X    = Self\n"
    "  NV#  = Connection traversing a bonded set of # NVLinks\n"
)


def fake_runner(outputs: dict[tuple[str, ...], str | Exception]) -> Any:
    calls: list[tuple[str, ...]] = []

    def run(argv: Sequence[str]) -> str:
        calls.append(tuple(argv))
        out = outputs[tuple(argv)]
        if isinstance(out, Exception):
            raise out
        return out

    run.calls = calls  # type: ignore[attr-defined]
    return run


def no_numa(bus_id: str) -> int:
    return -1


def test_parse_smi_csv() -> None:
    gpus = parse_smi_csv(SMI_CSV, numa_of=lambda bus: 7)

    assert gpus[0] == Gpu(
        index=0,
        name="NVIDIA A100-SXM4-80GB",
        memory_bytes=81920 * 1024**2,
        numa_node=7,
        pci_bus_id="00000000:07:00.0",
        uuid="GPU-aaaa-0000",
    )
    assert [g.index for g in gpus] == [0, 1, 2, 3]


def test_parse_smi_csv_rejects_garbage() -> None:
    with pytest.raises(ConfigError, match="unexpected GPU row"):
        parse_smi_csv("0, A100, [N/A], 0000:07:00.0\n")


def test_parse_smi_topology() -> None:
    topology = parse_smi_topology(SMI_TOPO_TEXT)

    assert topology == {
        0: (frozenset({1}), 0),
        1: (frozenset({0}), 0),
        2: (frozenset({3}), 1),
        3: (frozenset({2}), 1),
    }
    assert parse_smi_topology("garbage") == {}


def test_detect_with_nvidia_smi() -> None:
    run = fake_runner({SMI_QUERY: SMI_CSV, SMI_TOPO: SMI_TOPO_TEXT})

    inventory = detect_inventory(env={}, load_nvml=lambda: None, run=run, numa_of=no_numa)

    assert inventory.source == "nvidia-smi"
    assert [g.nvlink_peers for g in inventory.gpus] == [{1}, {0}, {3}, {2}]
    assert [g.numa_node for g in inventory.gpus] == [0, 0, 1, 1]
    assert run.calls == [SMI_QUERY, SMI_TOPO]


def test_topology_failure_keeps_the_gpus() -> None:
    run = fake_runner({SMI_QUERY: SMI_CSV, SMI_TOPO: subprocess.CalledProcessError(1, "topo")})

    inventory = detect_inventory(env={}, load_nvml=lambda: None, run=run, numa_of=no_numa)

    assert len(inventory.gpus) == 4
    assert all(not g.nvlink_peers for g in inventory.gpus)


def test_no_gpu_at_all() -> None:
    run = fake_runner({SMI_QUERY: FileNotFoundError("nvidia-smi")})

    inventory = detect_inventory(env={}, load_nvml=lambda: None, run=run)

    assert inventory == Inventory(
        gpus=(), source="none", notes=("nvidia-smi unavailable (FileNotFoundError)",)
    )


@pytest.mark.parametrize(
    ("visible", "indices"),
    [
        ("2,3", [2, 3]),
        ("3,1", [3, 1]),
        ("GPU-bbbb", [1]),
        ("0,7,1", [0]),  # CUDA stops at the first id that names no device
        ("", []),
        ("-1", []),
    ],
)
def test_cuda_visible_devices_is_honoured(visible: str, indices: list[int]) -> None:
    run = fake_runner({SMI_QUERY: SMI_CSV, SMI_TOPO: SMI_TOPO_TEXT})

    inventory = detect_inventory(
        env={"CUDA_VISIBLE_DEVICES": visible}, load_nvml=lambda: None, run=run, numa_of=no_numa
    )

    assert [g.index for g in inventory.gpus] == indices
    assert any(n.startswith(f"CUDA_VISIBLE_DEVICES={visible!r}") for n in inventory.notes)


def test_visible_devices_unset_keeps_everything() -> None:
    inventory = parse_declared("2x80GB")

    assert apply_visible_devices(inventory, None) is inventory


class FakeNvml:
    """Two H100s joined by NVLink, as pynvml reports them (bytes names on old bindings)."""

    NVML_P2P_CAPS_INDEX_NVLINK = 2
    NVML_P2P_STATUS_OK = 0

    def __init__(self) -> None:
        self.shut_down = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(total=81559 * 1024**2)

    def nvmlDeviceGetPciInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(busId=f"00000000:{0x18 + h:02X}:00.0".encode())

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h}"

    def nvmlDeviceGetNumaNodeId(self, h: int) -> int:
        raise RuntimeError("not supported by this driver")

    def nvmlDeviceGetP2PStatus(self, a: int, b: int, index: int) -> int:
        assert index == self.NVML_P2P_CAPS_INDEX_NVLINK
        return self.NVML_P2P_STATUS_OK


def test_detect_with_nvml() -> None:
    nvml = FakeNvml()

    inventory = detect_inventory(
        env={"CUDA_VISIBLE_DEVICES": "1"},
        load_nvml=lambda: nvml,
        run=fake_runner({}),
        numa_of=lambda b: 3,
    )

    assert inventory.source == "nvml"
    assert inventory.gpus == (
        Gpu(
            index=1,
            name="NVIDIA H100 80GB HBM3",
            memory_bytes=81559 * 1024**2,
            numa_node=3,
            pci_bus_id="00000000:19:00.0",
            nvlink_peers=frozenset({0}),
            uuid="GPU-1",
        ),
    )
    assert nvml.shut_down


def test_nvml_failure_falls_back_to_nvidia_smi() -> None:
    class Broken(FakeNvml):
        def nvmlInit(self) -> None:
            raise RuntimeError("NVML Shared Library Not Found")

    run = fake_runner({SMI_QUERY: SMI_CSV, SMI_TOPO: SMI_TOPO_TEXT})

    inventory = detect_inventory(env={}, load_nvml=Broken, run=run, numa_of=no_numa)

    assert inventory.source == "nvidia-smi"
    assert "NVML unavailable (NVML Shared Library Not Found)" in inventory.notes


def test_resolve_none_detects() -> None:
    declared = parse_declared("2xL4")

    assert resolve_inventory(None, detect=lambda: declared) is declared
