"""Render the chart with the real Helm engine (helm-python-sdk, no cluster) into plain objects.

The tests assert on parsed objects, never on template text, so they check what Kubernetes would
receive. One chart handle serves the whole test session: loading is the slow part.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "vllm-fleet"
RELEASE = "fleet"
NAMESPACE = "llm"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"

Obj = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    """The objects of one render (hooks included) and its NOTES.txt."""

    objects: tuple[Obj, ...]
    notes: str

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, component: str | None = None) -> Obj:
        """The single object of ``kind`` (with that ``app.kubernetes.io/component``)."""
        found = [
            o
            for o in self.of_kind(kind)
            if component is None or labels(o).get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
        return found[0]

    def kinds(self) -> list[str]:
        return sorted(o["kind"] for o in self.objects)


def labels(obj: Mapping[str, Any]) -> dict[str, str]:
    found: dict[str, str] = obj.get("metadata", {}).get("labels", {})
    return found


@contextmanager
def load_chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as chart:
        yield chart


def with_model(values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``values`` plus the one required value, model.name."""
    merged: dict[str, Any] = {"model": {"name": MODEL}}
    for key, value in (values or {}).items():
        if key == "model":
            merged["model"] = {**merged["model"], **value}
        else:
            merged[key] = value
    return merged


def render(chart: helm.Chart, values: Mapping[str, Any] | None) -> Rendered:
    """Validate ``values`` against the schema, then render as ``helm install`` would."""
    chart.validate_schema(dict(values or {}))
    manifests = chart.render(dict(values or {}), name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[Obj] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc is not None:
                assert isinstance(doc, dict), f"{path}: a document is not a mapping"
                objects.append(doc)
    return Rendered(tuple(objects), notes)
