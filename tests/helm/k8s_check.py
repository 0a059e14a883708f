"""Check rendered objects against Kubernetes' own OpenAPI schemas (kubernetes-validate), and the
custom resources the chart may render against the few fields their controllers need.

kubernetes-validate only knows built-in kinds; for a CRD it raises SchemaNotFoundError. Those
kinds get a small structural check here instead, and the pod templates inside a LeaderWorkerSet
are validated as real Pods, so the biggest custom object is checked as strictly as a Deployment.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import jsonschema
import referencing
from kubernetes_validate import utils as kv_utils

from tests.helm.render import Obj

#: The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas
#: kubernetes-validate ships: the chart must be valid on both.
KUBE_VERSIONS = ("1.30.0", kv_utils.latest_version())


@functools.cache
def _validator(version: str, api_version: str, kind: str) -> Any:
    """The strict validator of one kind, built once: kubernetes_validate.validate() would re-read
    its 2 MB definitions file for every object, which is most of this suite's time."""
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    try:
        schema = kv_utils.schema_contents(f"{folder}/{kind.lower()}-{group_version}.json", version)
    except FileNotFoundError:
        raise kv_utils.SchemaNotFoundError(kind, version, api_version) from None
    definitions = kv_utils.schema_contents(f"{folder}/_definitions.json", version)
    registry: referencing.Registry[Any] = referencing.Resource.from_contents(definitions) @ (
        referencing.Resource.from_contents(schema) @ referencing.Registry()
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_builtin(obj: Obj, version: str) -> None:
    """Raise if ``obj`` breaks the strict schema of its kind (unknown fields rejected)."""
    assert version in kv_utils.all_versions(), f"no schemas for Kubernetes {version}"
    _validator(version, obj["apiVersion"], obj["kind"]).validate(obj)


def _require(obj: Mapping[str, Any], path: str, kind: type | tuple[type, ...]) -> Any:
    node: Any = obj
    for part in path.split("."):
        assert isinstance(node, Mapping) and part in node, f"missing {path}"
        node = node[part]
    assert isinstance(node, kind), f"{path} is {type(node).__name__}, not {kind}"
    return node


def _metadata(obj: Obj) -> None:
    _require(obj, "metadata.name", str)
    _require(obj, "metadata.labels", dict)


def _pod_template_as_pod(template: Mapping[str, Any], version: str) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template.get("metadata", {})}
    pod["spec"] = template["spec"]
    validate_builtin(pod, version)


def check_leaderworkerset(obj: Obj, version: str) -> None:
    _metadata(obj)
    template = _require(obj, "spec.leaderWorkerTemplate", dict)
    size = _require(template, "size", int)
    assert size >= 1
    assert template["restartPolicy"] in ("RecreateGroupOnPodRestart", "None")
    for part in ("leaderTemplate", "workerTemplate"):
        _pod_template_as_pod(_require(template, part, dict), version)


def check_servicemonitor(obj: Obj, version: str) -> None:
    _metadata(obj)
    _require(obj, "spec.selector.matchLabels", dict)
    endpoints = _require(obj, "spec.endpoints", list)
    assert endpoints
    for endpoint in endpoints:
        assert isinstance(endpoint.get("port"), str) and endpoint["path"].startswith("/")
        if "authorization" in endpoint:
            # SafeAuthorization: a type and a SecretKeySelector in the ServiceMonitor's namespace.
            auth = endpoint["authorization"]
            assert set(auth) <= {"type", "credentials"}, auth
            assert auth.get("type", "Bearer") != "Basic", "use basicAuth for Basic"
            credentials = _require(auth, "credentials", dict)
            assert set(credentials) <= {"name", "key", "optional"}, credentials
            assert _require(credentials, "name", str) and _require(credentials, "key", str)


def check_scaledobject(obj: Obj, version: str) -> None:
    _metadata(obj)
    _require(obj, "spec.scaleTargetRef.name", str)
    assert _require(obj, "spec.minReplicaCount", int) <= _require(obj, "spec.maxReplicaCount", int)
    triggers = _require(obj, "spec.triggers", list)
    assert triggers
    for trigger in triggers:
        # KEDA trigger metadata is a map of strings: a number there is rejected by its webhook.
        metadata = _require(trigger, "metadata", dict)
        assert all(isinstance(v, str) for v in metadata.values()), metadata


def check_httproute(obj: Obj, version: str) -> None:
    _metadata(obj)
    parents = _require(obj, "spec.parentRefs", list)
    assert parents and all(isinstance(p.get("name"), str) for p in parents)
    for rule in _require(obj, "spec.rules", list):
        for ref in rule["backendRefs"]:
            assert isinstance(ref["name"], str) and isinstance(ref["port"], int)


CUSTOM_CHECKS: dict[tuple[str, str], Callable[[Obj, str], None]] = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): check_leaderworkerset,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): check_servicemonitor,
    ("keda.sh/v1alpha1", "ScaledObject"): check_scaledobject,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): check_httproute,
}


def check_object(obj: Obj, version: str) -> None:
    """Validate one rendered object for one Kubernetes version, whatever its kind."""
    custom = CUSTOM_CHECKS.get((obj["apiVersion"], obj["kind"]))
    if custom is not None:
        custom(obj, version)
    else:
        validate_builtin(obj, version)
