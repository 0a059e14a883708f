"""Which GPUs form each tensor-parallel group: NUMA nodes first, then NVLink peers, then PCIe
order.

A TP group exchanges activations on every layer, so its GPUs should share a NUMA node and, where
the inventory knows it, NVLink; the notes say when a group has to do without either.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from vllm_fleet.launcher.plan_types import Gpu


def _bus_key(gpu: Gpu) -> tuple[int, ...]:
    parts = gpu.pci_bus_id.lower().replace(".", ":").split(":")
    try:
        return tuple(int(p, 16) for p in parts) if gpu.pci_bus_id else ()
    except ValueError:
        return ()


def _order(gpu: Gpu) -> tuple[tuple[int, ...], int]:
    # no bus id sorts before any bus id; index breaks ties so the order is total.
    return (_bus_key(gpu), gpu.index)


def _linked(a: Gpu, b: Gpu) -> bool:
    return b.index in a.nvlink_peers or a.index in b.nvlink_peers


def _groups_within(gpus: list[Gpu], tp: int) -> tuple[list[tuple[Gpu, ...]], list[Gpu]]:
    """Greedy: start at the lowest PCIe address, add GPUs NVLinked to every member, then the
    next by PCIe address."""
    remaining = sorted(gpus, key=_order)
    groups: list[tuple[Gpu, ...]] = []
    while len(remaining) >= tp:
        group = [remaining.pop(0)]
        for cand in list(remaining):
            if len(group) == tp:
                break
            if all(_linked(cand, member) for member in group):
                group.append(cand)
                remaining.remove(cand)
        while len(group) < tp:
            group.append(remaining.pop(0))
        groups.append(tuple(group))
    return groups, remaining


def tp_groups(gpus: Sequence[Gpu], tp: int) -> tuple[list[tuple[Gpu, ...]], list[Gpu], list[str]]:
    """Split GPUs of one kind into TP groups: within a NUMA node first, across nodes only for
    what is left over. Returns (groups, leftover GPUs, notes)."""
    by_node: dict[int, list[Gpu]] = defaultdict(list)
    for gpu in gpus:
        by_node[gpu.numa_node].append(gpu)
    groups: list[tuple[Gpu, ...]] = []
    rest: list[Gpu] = []
    for node in sorted(by_node):
        found, left = _groups_within(by_node[node], tp)
        groups += found
        rest += left
    notes: list[str] = []
    if len(rest) >= tp:
        found, rest = _groups_within(rest, tp)
        for group in found:
            nodes = sorted({g.numa_node for g in group})
            if len(nodes) > 1:
                notes.append(
                    f"GPUs {gpu_indices(group)} span NUMA nodes {','.join(map(str, nodes))}: "
                    "no node has enough free GPUs for a TP group"
                )
        groups += found
    for group in groups:
        if tp > 1 and any(g.nvlink_peers for g in gpus):
            pairs = [(a, b) for i, a in enumerate(group) for b in group[i + 1 :]]
            if not all(_linked(a, b) for a, b in pairs):
                notes.append(
                    f"GPUs {gpu_indices(group)} are not all NVLink peers: TP traffic uses PCIe"
                )
    groups.sort(key=lambda g: min(x.index for x in g))
    return groups, rest, notes


def gpu_indices(gpus: Sequence[Gpu]) -> str:
    """GPU indices as the notes print them ("0,1,2")."""
    return ",".join(str(i) for i in sorted(g.index for g in gpus))
