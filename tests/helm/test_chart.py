"""The Helm chart, rendered by the real Helm engine for the setups users run, and checked for the
facts that decide whether a fleet works: every object valid for Kubernetes, GPUs equal to the
tensor-parallel size, the router looking for the engines where the engines are, probes that
survive slow model loads, a locked-down router, and selectors that match.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest

from tests.helm.k8s_check import KUBE_VERSIONS, check_object
from tests.helm.render import (
    CHART_DIR,
    MODEL,
    NAMESPACE,
    RELEASE,
    Obj,
    Rendered,
    labels,
    load_chart,
    render,
    with_model,
)
from vllm_fleet.launcher.vllm_args import SERVER_MODULE
from vllm_fleet.router.config import OPTIONS, config_from_args

GPU = "nvidia.com/gpu"
MODEL_LABEL = "vllm-fleet.io/model"
ROLE_LABEL = "vllm-fleet.io/role"

#: The setups the issue names, plus the variants of cache, secrets and exposure.
CASES: dict[str, dict[str, Any]] = {
    "defaults": with_model(),
    "tp1-x8": with_model({"engine": {"replicas": 8, "tensorParallelSize": 1}}),
    # Large numbers too: Helm holds values as float64 and prints 1048576 as 1.048576e+06 unless
    # the template converts it.
    "tp4-x2": with_model(
        {
            "engine": {
                "replicas": 2,
                "tensorParallelSize": 4,
                "maxModelLen": 1048576,
                "progressDeadlineSeconds": 10000000,
                "extraArgs": ["--max-num-batched-tokens", 2097152, "--kv-cache-memory", 0.5],
            },
            "router": {"config": {"maxBodyBytes": 104857600, "firstByteTimeoutSeconds": 1200}},
        }
    ),
    "multi-node": with_model(
        {
            "engine": {
                "replicas": 2,
                "tensorParallelSize": 8,
                "multiNode": {"enabled": True, "pipelineParallelSize": 2},
            }
        }
    ),
    "monitoring-keda": with_model(
        {"serviceMonitor": {"enabled": True}, "autoscaling": {"keda": {"enabled": True}}}
    ),
    "monitoring-hpa": with_model(
        {"serviceMonitor": {"enabled": True}, "autoscaling": {"hpa": {"enabled": True}}}
    ),
    "multi-node-hpa": with_model(
        {
            "engine": {"tensorParallelSize": 4, "multiNode": {"enabled": True}},
            "autoscaling": {"hpa": {"enabled": True}, "maxReplicas": 3},
        }
    ),
    "ingress": with_model(
        {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
            }
        }
    ),
    "gateway": with_model(
        {
            "httpRoute": {
                "enabled": True,
                "parentRefs": [{"name": "public", "namespace": "gateway-system"}],
                "hostnames": ["llm.example.com"],
            }
        }
    ),
    "existing-secrets": with_model(
        {
            "hfToken": {"existingSecret": "hf"},
            "apiKeys": {"existingSecret": "client-keys"},
            "adminApiKeys": {"existingSecret": "admin-keys"},
            "upstreamApiKey": {"existingSecret": "engine-key"},
        }
    ),
    "created-secrets": with_model(
        {
            "hfToken": {"value": "hf_secret_token"},
            "apiKeys": {"keys": ["key-one", "key-two"]},
            "adminApiKeys": {"keys": ["admin-one", "admin-two"]},
            "upstreamApiKey": {"value": "upstream-secret"},
        }
    ),
    # The router ServiceMonitor scrapes /metrics with the admin key (created, or existing).
    "admin-key-monitored": with_model(
        {"serviceMonitor": {"enabled": True}, "adminApiKeys": {"keys": ["admin-only"]}}
    ),
    "admin-existing-monitored": with_model(
        {
            "serviceMonitor": {"enabled": True},
            "adminApiKeys": {"existingSecret": "admin-keys", "secretKey": "token"},
        }
    ),
    "network-policy": with_model(
        {
            "networkPolicy": {
                "enabled": True,
                "metricsFrom": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                        }
                    }
                ],
            }
        }
    ),
    "network-policy-multi-node": with_model(
        {"engine": {"multiNode": {"enabled": True}}, "networkPolicy": {"enabled": True}}
    ),
    "cache-pvc": with_model({"engine": {"modelCache": {"type": "pvc"}}}),
    "cache-existing-claim": with_model(
        {"engine": {"modelCache": {"type": "existingClaim", "existingClaim": "weights"}}}
    ),
    "cache-host-path": with_model({"engine": {"modelCache": {"type": "hostPath"}}}),
    "long-names": with_model({"fullnameOverride": "f" * 63, "router": {"service": {"port": 80}}}),
    "load-balancer": with_model({"router": {"service": {"type": "LoadBalancer", "nodePort": 0}}}),
    "no-peers": with_model({"router": {"peers": {"enabled": False}}}),
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with load_chart() as loaded:
        yield loaded


@pytest.fixture(scope="module")
def rendered(chart: helm.Chart) -> dict[str, Rendered]:
    return {name: render(chart, values) for name, values in CASES.items()}


# -- helpers over rendered objects ---------------------------------------------------------


def is_multi_node(case: str) -> bool:
    return bool(CASES[case].get("engine", {}).get("multiNode", {}).get("enabled"))


def engine_value(case: str, key: str, default: Any) -> Any:
    return CASES[case].get("engine", {}).get(key, default)


def engine_pod_templates(out: Rendered) -> list[dict[str, Any]]:
    """Pod templates of every engine pod: the Deployment's, or a LeaderWorkerSet's two."""
    workloads = [o for o in out.of_kind("Deployment") if _component(o) == "engine"]
    if workloads:
        return [workloads[0]["spec"]["template"]]
    lws = out.one("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    return [lws["leaderTemplate"], lws["workerTemplate"]]


def serving_engine_container(out: Rendered) -> dict[str, Any]:
    """The container that serves HTTP: the engine, or the multi-node leader."""
    container: dict[str, Any] = engine_pod_templates(out)[0]["spec"]["containers"][0]
    return container


def router_container(out: Rendered) -> dict[str, Any]:
    deployment = out.one("Deployment", "router")
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def port_named(container: dict[str, Any], name: str) -> int:
    ports = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    assert len(ports) == 1, f"{container['name']} has no single port named {name}"
    port: int = ports[0]
    return port


def arg_after(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def _component(obj: Obj) -> str | None:
    return labels(obj).get("app.kubernetes.io/component")


def headless_service(out: Rendered) -> Obj:
    return out.one("Service", "engine")


def router_service(out: Rendered) -> Obj:
    return out.one("Service", "router")


def selects(selector: dict[str, str], pod_labels: dict[str, str]) -> bool:
    return all(pod_labels.get(k) == v for k, v in selector.items())


# -- the chart as a whole -------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean_in_strict_mode(case: str) -> None:
    """`helm lint --strict` for every setup: warnings are errors, and deprecated APIs are judged
    against the oldest Kubernetes the chart supports."""
    report = helm.lint(
        CHART_DIR, CASES[case], strict=True, namespace=NAMESPACE, kube_version="v1.30.0"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_the_issue_command_line_renders() -> None:
    """`helm install fleet ./helm/vllm-fleet --set model.name=... --set engine.replicas=4`."""
    values = helm.parse_set_string(f"model.name={MODEL},engine.replicas=4")
    with load_chart() as chart:
        out = render(chart, values)
    assert out.one("Deployment", "engine")["spec"]["replicas"] == 4
    assert serving_engine_container(out)["args"][:2] == ["--model", MODEL]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_every_object_is_valid_kubernetes(
    rendered: dict[str, Rendered], case: str, version: str
) -> None:
    for obj in rendered[case].objects:
        try:
            check_object(obj, version)
        except Exception as exc:  # the object's name makes the failure findable
            name = obj.get("metadata", {}).get("name")
            pytest.fail(f"{case}: {obj['kind']} {name} invalid for Kubernetes {version}: {exc}")


@pytest.mark.parametrize("case", CASES)
def test_names_fit_and_do_not_collide(rendered: dict[str, Rendered], case: str) -> None:
    seen: set[tuple[str, str]] = set()
    for obj in rendered[case].objects:
        name = obj["metadata"]["name"]
        assert len(name) <= 63, f"{obj['kind']} name {name!r} is longer than a DNS label"
        assert (obj["kind"], name) not in seen, f"two {obj['kind']} objects named {name}"
        seen.add((obj["kind"], name))


@pytest.mark.parametrize("case", CASES)
def test_standard_labels_everywhere(rendered: dict[str, Rendered], case: str) -> None:
    for obj in rendered[case].objects:
        found = labels(obj)
        assert found.get("app.kubernetes.io/name") == "vllm-fleet", obj["kind"]
        assert found.get("app.kubernetes.io/instance") == RELEASE, obj["kind"]
        assert found.get("app.kubernetes.io/managed-by") == "Helm", obj["kind"]
        assert found.get("helm.sh/chart", "").startswith("vllm-fleet-"), obj["kind"]


@pytest.mark.parametrize("case", CASES)
def test_selectors_are_stable_and_match_their_pods(
    rendered: dict[str, Rendered], case: str
) -> None:
    """Selectors hold only labels fixed for a release's life (no version, no chart), and each
    Deployment, Service and PDB selects the pods it is meant for."""
    out = rendered[case]
    stable = {
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/component",
        MODEL_LABEL,
        ROLE_LABEL,
    }
    for deployment in out.of_kind("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert set(selector) <= stable
        assert selects(selector, deployment["spec"]["template"]["metadata"]["labels"])
    router_pods = out.one("Deployment", "router")["spec"]["template"]["metadata"]["labels"]
    assert selects(router_service(out)["spec"]["selector"], router_pods)
    router_pdb = out.one("PodDisruptionBudget", "router")
    assert selects(router_pdb["spec"]["selector"]["matchLabels"], router_pods)
    engine_selector = headless_service(out)["spec"]["selector"]
    assert set(engine_selector) <= stable
    templates = engine_pod_templates(out)
    # Only pods running the OpenAI server are in DNS: a multi-node group's leader, not its
    # Ray workers.
    assert engine_selector[ROLE_LABEL] == "server"
    assert selects(engine_selector, templates[0]["metadata"]["labels"])
    if is_multi_node(case):
        assert not selects(engine_selector, templates[1]["metadata"]["labels"])
    for template in templates:
        assert not selects(router_service(out)["spec"]["selector"], template["metadata"]["labels"])


# -- engines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_each_engine_pod_requests_tensor_parallel_gpus(
    rendered: dict[str, Rendered], case: str
) -> None:
    tp = engine_value(case, "tensorParallelSize", 1)
    out = rendered[case]
    for template in engine_pod_templates(out):
        (container,) = template["spec"]["containers"]
        assert container["resources"]["limits"][GPU] == tp
    args = serving_engine_container(out)["args"]
    assert arg_after(args, "--tensor-parallel-size") == str(tp)


@pytest.mark.parametrize("case", CASES)
def test_engine_replicas_follow_values_unless_autoscaled(
    rendered: dict[str, Rendered], case: str
) -> None:
    out = rendered[case]
    autoscaled = bool(out.of_kind("HorizontalPodAutoscaler") or out.of_kind("ScaledObject"))
    workload = (
        out.one("LeaderWorkerSet") if is_multi_node(case) else out.one("Deployment", "engine")
    )
    if autoscaled:
        assert "replicas" not in workload["spec"], "the autoscaler owns replicas"
    else:
        assert workload["spec"]["replicas"] == engine_value(case, "replicas", 1)


@pytest.mark.parametrize("case", CASES)
def test_engine_serves_the_model_with_values_args(rendered: dict[str, Rendered], case: str) -> None:
    container = serving_engine_container(rendered[case])
    args = container["args"]
    assert args[:2] == ["--model", MODEL]
    assert arg_after(args, "--served-model-name") == MODEL
    assert arg_after(args, "--port") == str(port_named(container, "http"))
    assert arg_after(args, "--host") == "0.0.0.0"
    extra = [str(a) for a in engine_value(case, "extraArgs", [])]
    assert args[len(args) - len(extra) :] == extra
    max_len = engine_value(case, "maxModelLen", 0)
    assert ("--max-model-len" in args) == bool(max_len)
    if max_len:
        assert arg_after(args, "--max-model-len") == str(max_len)


@pytest.mark.parametrize("case", CASES)
def test_engine_probes_survive_a_slow_model_load(rendered: dict[str, Rendered], case: str) -> None:
    container = serving_engine_container(rendered[case])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 30 * 60


@pytest.mark.parametrize("case", CASES)
def test_engine_pods_have_shm_cache_gpu_scheduling_and_a_drain(
    rendered: dict[str, Rendered], case: str
) -> None:
    for template in engine_pod_templates(rendered[case]):
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
        assert volumes["shm"]["emptyDir"]["sizeLimit"]
        mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["shm"] == "/dev/shm"
        env = env_of(spec["containers"][0])
        assert env["HF_HOME"]["value"] == mounts["model-cache"]
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        (spread,) = spec["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert selects(spread["labelSelector"]["matchLabels"], template["metadata"]["labels"])
        assert spec["terminationGracePeriodSeconds"] >= 60
        assert spec["automountServiceAccountToken"] is False
        security = spec["containers"][0]["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize(
    ("case", "volume"),
    [
        ("defaults", {"emptyDir": {"sizeLimit": "200Gi"}}),
        ("cache-pvc", {"persistentVolumeClaim": {"claimName": "fleet-vllm-fleet-model-cache"}}),
        ("cache-existing-claim", {"persistentVolumeClaim": {"claimName": "weights"}}),
        (
            "cache-host-path",
            {"hostPath": {"path": "/var/lib/vllm-fleet/models", "type": "DirectoryOrCreate"}},
        ),
    ],
)
def test_model_cache_kind_follows_values(
    rendered: dict[str, Rendered], case: str, volume: dict[str, Any]
) -> None:
    out = rendered[case]
    spec = engine_pod_templates(out)[0]["spec"]
    (cache,) = [v for v in spec["volumes"] if v["name"] == "model-cache"]
    assert cache == {"name": "model-cache", **volume}
    claims = out.of_kind("PersistentVolumeClaim")
    if case == "cache-pvc":
        (claim,) = claims
        assert claim["metadata"]["name"] == volume["persistentVolumeClaim"]["claimName"]
        assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    else:
        assert claims == []


def test_headless_service_publishes_only_ready_engines(rendered: dict[str, Rendered]) -> None:
    for out in rendered.values():
        spec = headless_service(out)["spec"]
        assert spec["clusterIP"] == "None"
        assert spec["publishNotReadyAddresses"] is False


# -- the router and how it finds the engines ------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_router_discovers_the_engines_where_they_listen(
    rendered: dict[str, Rendered], case: str
) -> None:
    out = rendered[case]
    name, _, port = env_of(router_container(out))["FLEET_DISCOVER_DNS"]["value"].rpartition(":")
    service = headless_service(out)
    assert name == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    (service_port,) = service["spec"]["ports"]
    assert int(port) == service_port["port"] == port_named(serving_engine_container(out), "http")
    assert service_port["targetPort"] == "http"


@pytest.mark.parametrize("case", CASES)
def test_routers_find_each_other_through_their_headless_service(
    rendered: dict[str, Rendered], case: str
) -> None:
    """Each router pod resolves a headless Service over the router pods (its peers, to share
    what prefixes it sent where: docs/prefix-routing.md); off, neither the Service nor the
    variable exists."""
    out = rendered[case]
    env = env_of(router_container(out))
    peers = [s for s in out.of_kind("Service") if _component(s) == "router-peers"]
    if not CASES[case].get("router", {}).get("peers", {}).get("enabled", True):
        assert peers == [] and "FLEET_DISCOVER_PEERS_DNS" not in env
        return
    (service,) = peers
    name, _, port = env["FLEET_DISCOVER_PEERS_DNS"]["value"].rpartition(":")
    assert name == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert service["spec"]["clusterIP"] == "None"
    router_pods = out.one("Deployment", "router")["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], router_pods)
    (service_port,) = service["spec"]["ports"]
    assert int(port) == service_port["port"] == port_named(router_container(out), "http")


@pytest.mark.parametrize("case", CASES)
def test_router_env_is_a_valid_router_config(rendered: dict[str, Rendered], case: str) -> None:
    """Every FLEET_* variable the chart sets is one the router reads, and together they parse
    into a RouterConfig (the router's own validation), so the pods cannot crash-loop on them."""
    container = router_container(rendered[case])
    known = {opt.env for opt in OPTIONS}
    environ: dict[str, str] = {}
    for name, entry in env_of(container).items():
        if not name.startswith("FLEET_"):
            continue
        assert name in known, f"the router has no setting {name}"
        environ[name] = entry.get("value", "from-a-secret")
    args = argparse.Namespace(**{opt.field: None for opt in OPTIONS})
    config = config_from_args(args, environ)
    assert config.port == port_named(container, "http")
    assert config.discover_dns is not None


@pytest.mark.parametrize("case", CASES)
def test_router_is_locked_down_and_probed(rendered: dict[str, Rendered], case: str) -> None:
    out = rendered[case]
    deployment = out.one("Deployment", "router")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    container = router_container(out)
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    grace = float(env_of(container)["FLEET_SHUTDOWN_GRACE"]["value"])
    assert pod["terminationGracePeriodSeconds"] > grace
    assert out.one("PodDisruptionBudget", "router")["spec"]["minAvailable"] >= 1
    assert router_service(out)["spec"]["ports"][0]["targetPort"] == "http"


def test_router_service_is_cluster_ip_by_default(rendered: dict[str, Rendered]) -> None:
    assert router_service(rendered["defaults"])["spec"]["type"] == "ClusterIP"
    assert router_service(rendered["load-balancer"])["spec"]["type"] == "LoadBalancer"
    assert "nodePort" not in router_service(rendered["load-balancer"])["spec"]["ports"][0]


# -- secrets ----------------------------------------------------------------------------------


def _secret_ref(container: dict[str, Any], name: str) -> tuple[str, str]:
    ref = env_of(container)[name]["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def test_existing_secrets_are_referenced_not_created(rendered: dict[str, Rendered]) -> None:
    out = rendered["existing-secrets"]
    assert out.of_kind("Secret") == []
    engine, router = serving_engine_container(out), router_container(out)
    assert _secret_ref(engine, "HF_TOKEN") == ("hf", "HF_TOKEN")
    # the router loads gated models' tokenizers for precise prefix matching with it too
    assert _secret_ref(router, "HF_TOKEN") == ("hf", "HF_TOKEN")
    assert _secret_ref(engine, "VLLM_API_KEY") == ("engine-key", "upstream-api-key")
    assert _secret_ref(router, "FLEET_API_KEYS") == ("client-keys", "api-keys")
    assert _secret_ref(router, "FLEET_ADMIN_API_KEYS") == ("admin-keys", "admin-api-keys")
    assert _secret_ref(router, "FLEET_UPSTREAM_API_KEY") == ("engine-key", "upstream-api-key")


def test_created_secrets_hold_the_values_and_pods_only_reference_them(
    rendered: dict[str, Rendered],
) -> None:
    out = rendered["created-secrets"]
    secrets = {
        s["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
        for s in out.of_kind("Secret")
    }
    engine, router = serving_engine_container(out), router_container(out)
    hf_name, hf_key = _secret_ref(engine, "HF_TOKEN")
    assert secrets[hf_name][hf_key] == "hf_secret_token"
    assert _secret_ref(router, "HF_TOKEN") == (hf_name, hf_key)
    keys_name, keys_key = _secret_ref(router, "FLEET_API_KEYS")
    assert secrets[keys_name][keys_key] == "key-one,key-two"
    admin_name, admin_key = _secret_ref(router, "FLEET_ADMIN_API_KEYS")
    assert admin_name == "fleet-vllm-fleet-admin-api-keys" != keys_name
    assert secrets[admin_name] == {admin_key: "admin-one,admin-two"}
    up_name, up_key = _secret_ref(router, "FLEET_UPSTREAM_API_KEY")
    assert _secret_ref(engine, "VLLM_API_KEY") == (up_name, up_key)
    assert secrets[up_name][up_key] == "upstream-secret"
    for obj in out.objects:
        if obj["kind"] != "Secret":
            text = repr(obj)
            for value in ("hf_secret_token", "key-one", "admin-one", "upstream-secret"):
                assert value not in text, f"{obj['kind']} carries a secret in plain text"


def test_without_secrets_no_auth_env_is_set(rendered: dict[str, Rendered]) -> None:
    out = rendered["defaults"]
    assert out.of_kind("Secret") == []
    assert not {"HF_TOKEN", "VLLM_API_KEY"} & set(env_of(serving_engine_container(out)))
    router_env = set(env_of(router_container(out)))
    assert not {"FLEET_API_KEYS", "FLEET_ADMIN_API_KEYS", "FLEET_UPSTREAM_API_KEY"} & router_env
    assert "HF_TOKEN" not in router_env


# -- multi-node -------------------------------------------------------------------------------


def test_multi_node_runs_vllm_over_ray_in_leaderworkerset_groups(
    rendered: dict[str, Rendered],
) -> None:
    out = rendered["multi-node"]
    assert [o for o in out.of_kind("Deployment") if _component(o) == "engine"] == []
    lws = out.one("LeaderWorkerSet")
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"
    (leader,) = template["leaderTemplate"]["spec"]["containers"]
    (worker,) = template["workerTemplate"]["spec"]["containers"]
    leader_script = leader["command"][2]
    assert leader["command"][:2] == ["/bin/sh", "-c"]
    assert "ray start --head --port=6379" in leader_script
    assert f'exec python3 -m {SERVER_MODULE} "$@"' in leader_script
    assert "LWS_GROUP_SIZE" in leader_script  # waits for the whole group
    args = leader["args"]
    assert arg_after(args, "--tensor-parallel-size") == "8"
    assert arg_after(args, "--pipeline-parallel-size") == str(template["size"])
    assert arg_after(args, "--distributed-executor-backend") == "ray"
    worker_script = worker["command"][2]
    assert "ray start --address=${LWS_LEADER_ADDRESS}:6379 --block" in worker_script
    assert SERVER_MODULE not in worker_script
    assert "readinessProbe" not in worker  # workers serve no HTTP
    assert port_named(leader, "ray") == 6379


def test_single_node_engines_have_no_ray(rendered: dict[str, Rendered]) -> None:
    container = serving_engine_container(rendered["tp4-x2"])
    assert container["command"] == ["python3", "-m", SERVER_MODULE]
    assert "--distributed-executor-backend" not in container["args"]
    assert "--pipeline-parallel-size" not in container["args"]


# -- autoscaling and monitoring ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "kind"),
    [
        ("monitoring-hpa", "Deployment"),
        ("multi-node-hpa", "LeaderWorkerSet"),
        ("monitoring-keda", "Deployment"),
    ],
)
def test_autoscaler_targets_the_engines(
    rendered: dict[str, Rendered], case: str, kind: str
) -> None:
    out = rendered[case]
    scalers = out.of_kind("HorizontalPodAutoscaler") + out.of_kind("ScaledObject")
    (scaler,) = scalers
    target = scaler["spec"]["scaleTargetRef"]
    workload = out.one(kind, "engine")
    assert (target["kind"], target["name"]) == (kind, workload["metadata"]["name"])
    assert target["apiVersion"] == workload["apiVersion"]
    if scaler["kind"] == "HorizontalPodAutoscaler":
        (metric,) = scaler["spec"]["metrics"]
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
        assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "5"}
    else:
        (trigger,) = scaler["spec"]["triggers"]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        assert "vllm:num_requests_waiting" in query
        assert headless_service(out)["metadata"]["name"] in query


def test_service_monitors_scrape_router_and_engines(rendered: dict[str, Rendered]) -> None:
    out = rendered["monitoring-keda"]
    monitors = {_component(m): m for m in out.of_kind("ServiceMonitor")}
    assert set(monitors) == {"router", "engine"}
    for component, service in (("router", router_service(out)), ("engine", headless_service(out))):
        spec = monitors[component]["spec"]
        assert selects(spec["selector"]["matchLabels"], labels(service))
        (endpoint,) = spec["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert not selects(
        monitors["router"]["spec"]["selector"]["matchLabels"], labels(headless_service(out))
    )


@pytest.mark.parametrize(
    ("case", "credentials"),
    [
        ("monitoring-keda", None),
        (
            "admin-key-monitored",
            {"name": "fleet-vllm-fleet-admin-api-keys", "key": "admin-api-keys"},
        ),
        ("admin-existing-monitored", {"name": "admin-keys", "key": "token"}),
    ],
)
def test_router_service_monitor_sends_the_admin_key_only_when_set(
    rendered: dict[str, Rendered], case: str, credentials: dict[str, str] | None
) -> None:
    """With admin keys the router's /metrics refuses anonymous scrapes, so the ServiceMonitor
    carries the very Secret the router reads; vLLM's own /metrics stays open."""
    out = rendered[case]
    monitors = {_component(m): m for m in out.of_kind("ServiceMonitor")}
    (router_endpoint,) = monitors["router"]["spec"]["endpoints"]
    (engine_endpoint,) = monitors["engine"]["spec"]["endpoints"]
    assert "authorization" not in engine_endpoint
    env = env_of(router_container(out))
    if credentials is None:
        assert "authorization" not in router_endpoint
        assert "FLEET_ADMIN_API_KEYS" not in env
        return
    expected = {"type": "Bearer", "credentials": credentials}
    assert router_endpoint["authorization"] == expected
    ref = _secret_ref(router_container(out), "FLEET_ADMIN_API_KEYS")
    assert ref == (credentials["name"], credentials["key"])
    created = {s["metadata"]["name"]: s for s in out.of_kind("Secret")}
    if case == "admin-key-monitored":
        # The whole value is the token Prometheus sends: it must be exactly one admin key.
        data = created[credentials["name"]]["data"]
        assert base64.b64decode(data[credentials["key"]]).decode() == "admin-only"
    else:
        assert credentials["name"] not in created


def test_several_created_admin_keys_with_the_service_monitor_are_refused(
    chart: helm.Chart,
) -> None:
    monitored = {"serviceMonitor": {"enabled": True}}
    keys = {"keys": ["admin-one", "admin-two"]}
    with pytest.raises(helm.HelmRenderError) as caught:
        render(chart, with_model({**monitored, "adminApiKeys": keys}))
    (line,) = [ln for ln in str(caught.value).splitlines() if "adminApiKeys.keys" in ln]
    assert "single admin key while serviceMonitor.enabled" in line
    assert "adminApiKeys.existingSecret holding one key" in line
    # An existing Secret wins over `keys`: then the chart creates nothing and renders.
    existing = {**keys, "existingSecret": "admin-keys"}
    out = render(chart, with_model({**monitored, "adminApiKeys": existing}))
    assert out.of_kind("Secret") == []


def test_hpa_and_keda_together_are_refused(chart: helm.Chart) -> None:
    both = with_model({"autoscaling": {"hpa": {"enabled": True}, "keda": {"enabled": True}}})
    message = "enable at most one of autoscaling.hpa and autoscaling.keda"
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, both)


# -- network policy, exposure, helm test, notes ---------------------------------------------


@pytest.mark.parametrize("case", ["network-policy", "network-policy-multi-node"])
def test_network_policy_lets_only_the_router_reach_the_engines(
    rendered: dict[str, Rendered], case: str
) -> None:
    out = rendered[case]
    policy = out.one("NetworkPolicy")["spec"]
    for template in engine_pod_templates(out):
        assert selects(policy["podSelector"]["matchLabels"], template["metadata"]["labels"])
    router_pods = out.one("Deployment", "router")["spec"]["template"]["metadata"]["labels"]
    assert not selects(policy["podSelector"]["matchLabels"], router_pods)
    assert policy["policyTypes"] == ["Ingress"]
    api_rule = policy["ingress"][0]
    # the API, and the vLLM KV events the router subscribes to (precise prefix matching)
    assert api_rule["ports"] == [
        {"port": "http", "protocol": "TCP"},
        {"port": 5557, "protocol": "TCP"},
        {"port": 5558, "protocol": "TCP"},
    ]
    peers = api_rule["from"]
    assert selects(peers[0]["podSelector"]["matchLabels"], router_pods)
    if is_multi_node(case):
        # Ray and NCCL inside a group: engine pods to engine pods, nothing else.
        (group_rule,) = policy["ingress"][1:]
        (peer,) = group_rule["from"]
        worker_labels = engine_pod_templates(out)[1]["metadata"]["labels"]
        assert selects(peer["podSelector"]["matchLabels"], worker_labels)
    else:
        assert len(peers) == 2  # the router and the monitoring namespace
        assert len(policy["ingress"]) == 1


def test_ingress_and_httproute_point_at_the_router(rendered: dict[str, Rendered]) -> None:
    ingress_out = rendered["ingress"]
    service = router_service(ingress_out)
    ingress = ingress_out.one("Ingress")["spec"]
    backend = ingress["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert ingress["tls"][0]["secretName"] == "llm-tls"
    route_out = rendered["gateway"]
    route = route_out.one("HTTPRoute")["spec"]
    (ref,) = route["rules"][0]["backendRefs"]
    assert ref == {
        "name": router_service(route_out)["metadata"]["name"],
        "port": router_service(route_out)["spec"]["ports"][0]["port"],
    }
    assert route["parentRefs"] == [{"name": "public", "namespace": "gateway-system"}]


@pytest.mark.parametrize("case", ["defaults", "created-secrets", "long-names"])
def test_helm_test_pod_asks_the_model_through_the_router(
    rendered: dict[str, Rendered], case: str
) -> None:
    out = rendered[case]
    (pod,) = [p for p in out.of_kind("Pod") if _component(p) == "test"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = env_of(pod["spec"]["containers"][0])
    service = router_service(out)
    port = service["spec"]["ports"][0]["port"]
    assert env["BASE_URL"]["value"] == f"http://{service['metadata']['name']}:{port}"
    assert json.loads(env["SERVED_MODELS"]["value"]) == [MODEL]
    assert env["REQUEST"]["value"] == "chat"
    assert ("API_KEYS" in env) == (case == "created-secrets")
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_notes_tell_how_to_reach_the_endpoint(rendered: dict[str, Rendered]) -> None:
    notes = rendered["defaults"].notes
    service = router_service(rendered["defaults"])["metadata"]["name"]
    assert f"kubectl -n {NAMESPACE} port-forward svc/{service} 8000:8000" in notes
    assert '"model": "meta-llama/Llama-3.1-8B-Instruct"' in notes
    assert "curl https://llm.example.local/v1/chat/completions" in rendered["ingress"].notes
    assert "curl http://llm.example.com/v1/chat/completions" in rendered["gateway"].notes
    assert "curl http://<EXTERNAL-IP>:8000/v1/" in rendered["load-balancer"].notes
    assert "Authorization: Bearer" in rendered["created-secrets"].notes


@pytest.mark.parametrize(
    ("case", "secret"),
    [
        ("defaults", None),
        ("created-secrets", "fleet-vllm-fleet-admin-api-keys (key admin-api-keys)"),
        ("admin-existing-monitored", "admin-keys (key token)"),
    ],
)
def test_notes_name_the_admin_key_when_set(
    rendered: dict[str, Rendered], case: str, secret: str | None
) -> None:
    notes = rendered[case].notes
    if secret is None:
        assert "admin key" not in notes
    else:
        assert f"/fleet/* and /metrics need an admin key from Secret {secret}." in notes


@pytest.mark.parametrize(("workers", "expected"), [(4, 4), ("auto", None)])
def test_router_workers_reach_the_router(
    chart: helm.Chart, workers: int | str, expected: int | None
) -> None:
    """`router.workers` becomes FLEET_WORKERS, which the router parses (auto: its cores)."""
    out = render(chart, with_model({"router": {"workers": workers}}))
    env = env_of(router_container(out))
    assert env["FLEET_WORKERS"]["value"] == str(workers)
    args = argparse.Namespace(**{opt.field: None for opt in OPTIONS})
    environ = {"FLEET_WORKERS": env["FLEET_WORKERS"]["value"], "FLEET_BACKENDS": "http://e:8000"}
    config = config_from_args(args, environ)
    assert config.workers == (expected or len(os.sched_getaffinity(0)))


@pytest.mark.parametrize("workers", [0, "many", 2.5])
def test_bad_router_workers_are_refused(chart: helm.Chart, workers: object) -> None:
    with pytest.raises(helm.HelmValuesError, match="/router/workers"):
        render(chart, with_model({"router": {"workers": workers}}))


def test_engines_publish_kv_events_and_the_router_subscribes(chart: helm.Chart) -> None:
    """As launcher/vllm_args.py starts vLLM: a ZMQ publisher of KV events on 5557 and its
    replay socket on 5558 in every engine, and the router asking each engine where
    (FLEET_KV_EVENTS=auto)."""
    out = render(chart, with_model())
    (engine,) = [o for o in out.of_kind("Deployment") if _component(o) == "engine"]
    (container,) = engine["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    config = json.loads(args[args.index("--kv-events-config") + 1])
    assert config == {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://*:5557",
        "replay_endpoint": "tcp://*:5558",
    }
    assert {"name": "kv-events", "containerPort": 5557, "protocol": "TCP"} in container["ports"]
    assert {"name": "kv-replay", "containerPort": 5558, "protocol": "TCP"} in container["ports"]
    (router,) = out.one("Deployment", "router")["spec"]["template"]["spec"]["containers"]
    assert {"name": "FLEET_KV_EVENTS", "value": "auto"} in router["env"]
    own = with_model({"engine": {"extraArgs": ["--kv-events-config", "{}"]}})
    (engine,) = [o for o in render(chart, own).of_kind("Deployment") if _component(o) == "engine"]
    assert (
        engine["spec"]["template"]["spec"]["containers"][0]["args"].count("--kv-events-config") == 1
    )
