"""The chart with several models (issue 21): a three-model values file (a tensor-parallel model,
a multi-node LeaderWorkerSet model, a model with LoRA adapters) rendered by the real Helm engine,
every object valid for Kubernetes, and the per-model parts checked for what decides whether the
fleet works: each model its own workload, sizes and arguments; one Service the router resolves
that holds every model's serving pods and nothing else; a PodDisruptionBudget per model; the
router's CPU autoscaler; weights downloaded once; a real request per model in `helm test`; the
dashboard ConfigMap. The `model:` shortcut keeps the names and selectors it always had.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest

from tests.helm.k8s_check import KUBE_VERSIONS, check_object
from tests.helm.render import (
    CHART_DIR,
    NAMESPACE,
    RELEASE,
    Obj,
    Rendered,
    labels,
    load_chart,
    render,
    with_model,
)

GPU = "nvidia.com/gpu"
MODEL_LABEL = "vllm-fleet.io/model"
ROLE_LABEL = "vllm-fleet.io/role"
DASHBOARD = CHART_DIR / "dashboards" / "vllm-fleet.json"

LLAMA_70B = "meta-llama/Llama-3.1-70B-Instruct"
LLAMA_405B = "meta-llama/Llama-3.1-405B-Instruct"
LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
LORA = {"sql-lora": "yard1/llama-2-7b-sql-lora-test", "local-lora": "/models/adapters/local"}

#: The three-model fleet of the issue, with every optional part of the chart switched on.
THREE_MODELS: dict[str, Any] = {
    "models": [
        {
            "name": "llama-70b",
            "model": LLAMA_70B,
            "tensorParallelSize": 4,
            "replicas": 2,
            "maxModelLen": 32768,
            "resources": {"requests": {"cpu": "16", "memory": "128Gi"}},
            "extraArgs": ["--enable-prefix-caching"],
        },
        {
            "name": "llama-405b",
            "model": LLAMA_405B,
            "servedName": "llama-405b",
            "tensorParallelSize": 8,
            "multiNode": {"enabled": True, "pipelineParallelSize": 2},
        },
        {
            "name": "llama-8b",
            "model": LLAMA_8B,
            "servedName": "llama-8b",
            "replicas": 3,
            "loraModules": LORA,
            "nodeSelector": {"gpu": "l4"},
        },
    ],
    "engine": {"modelCache": {"type": "pvc", "predownload": {"enabled": True}}},
    "router": {"autoscaling": {"enabled": True, "maxReplicas": 6}},
    "dashboards": {"enabled": True, "annotations": {"grafana_folder": "LLM"}},
    "serviceMonitor": {"enabled": True},
    "networkPolicy": {"enabled": True},
}
#: name -> (model, served name, TP, replicas, multi-node)
EXPECTED = {
    "llama-70b": (LLAMA_70B, LLAMA_70B, 4, 2, False),
    "llama-405b": (LLAMA_405B, "llama-405b", 8, 1, True),
    "llama-8b": (LLAMA_8B, "llama-8b", 1, 3, False),
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with load_chart() as loaded:
        yield loaded


@pytest.fixture(scope="module")
def out(chart: helm.Chart) -> Rendered:
    return render(chart, THREE_MODELS)


def _component(obj: Obj) -> str | None:
    return labels(obj).get("app.kubernetes.io/component")


def _selects(selector: dict[str, str], pod_labels: dict[str, str]) -> bool:
    return all(pod_labels.get(k) == v for k, v in selector.items())


def _of_model(out: Rendered, kind: str, name: str) -> Obj:
    (found,) = [o for o in out.of_kind(kind) if labels(o).get(MODEL_LABEL) == name]
    return found


def _workload(out: Rendered, name: str) -> Obj:
    kind = "LeaderWorkerSet" if EXPECTED[name][4] else "Deployment"
    return _of_model(out, kind, name)


def _templates(workload: Obj) -> list[dict[str, Any]]:
    """The pod templates of a workload: a Deployment's one, a LeaderWorkerSet's leader and
    worker (in that order)."""
    if workload["kind"] == "Deployment":
        return [workload["spec"]["template"]]
    group = workload["spec"]["leaderWorkerTemplate"]
    return [group["leaderTemplate"], group["workerTemplate"]]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _values(container: dict[str, Any]) -> dict[str, str]:
    """The plain-value environment variables of a container (not those from Secrets)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _arg_after(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


# -- the whole render --------------------------------------------------------------------------


def test_lint_is_clean_in_strict_mode() -> None:
    report = helm.lint(
        CHART_DIR, THREE_MODELS, strict=True, namespace=NAMESPACE, kube_version="v1.30.0"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_is_valid_kubernetes(out: Rendered, version: str) -> None:
    for obj in out.objects:
        try:
            check_object(obj, version)
        except Exception as exc:
            name = obj.get("metadata", {}).get("name")
            pytest.fail(f"{obj['kind']} {name} invalid for Kubernetes {version}: {exc}")


def test_names_fit_and_do_not_collide(out: Rendered) -> None:
    seen: set[tuple[str, str]] = set()
    for obj in out.objects:
        name = obj["metadata"]["name"]
        assert len(name) <= 63, name
        assert (obj["kind"], name) not in seen, f"two {obj['kind']} named {name}"
        seen.add((obj["kind"], name))
    # A LeaderWorkerSet creates a Service under its own name: it must not be ours.
    services = {s["metadata"]["name"] for s in out.of_kind("Service")}
    assert not services & {w["metadata"]["name"] for w in out.of_kind("LeaderWorkerSet")}


# -- one workload per model ----------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPECTED)
def test_each_model_has_its_own_workload_sizes_and_arguments(out: Rendered, name: str) -> None:
    model, served, tp, replicas, _ = EXPECTED[name]
    workload = _workload(out, name)
    assert workload["metadata"]["name"] == f"{RELEASE}-vllm-fleet-engine-{name}"
    assert "replicas" not in workload["spec"] or workload["spec"]["replicas"] == replicas
    assert workload["spec"]["replicas"] == replicas
    templates = _templates(workload)
    for template in templates:
        (container,) = template["spec"]["containers"]
        assert container["resources"]["limits"][GPU] == tp
        assert template["metadata"]["labels"][MODEL_LABEL] == name
    args = templates[0]["spec"]["containers"][0]["args"]
    assert args[:2] == ["--model", model]
    assert _arg_after(args, "--served-model-name") == served
    assert _arg_after(args, "--tensor-parallel-size") == str(tp)
    # The selector is the model's own: it never adopts another model's pods.
    selector = workload["spec"].get("selector", {}).get("matchLabels")
    if selector is not None:
        assert selector[MODEL_LABEL] == name


def test_per_model_settings_override_engine_defaults_and_nothing_else(out: Rendered) -> None:
    big = _templates(_workload(out, "llama-70b"))[0]["spec"]
    (container,) = big["containers"]
    assert container["resources"]["requests"] == {"cpu": "16", "memory": "128Gi"}
    assert _arg_after(container["args"], "--max-model-len") == "32768"
    assert container["args"][-1] == "--enable-prefix-caching"
    small = _templates(_workload(out, "llama-8b"))[0]["spec"]
    assert small["nodeSelector"] == {"gpu": "l4"}
    assert "nodeSelector" not in big
    assert "--max-model-len" not in small["containers"][0]["args"]
    assert small["containers"][0]["resources"]["requests"] == {"cpu": "4", "memory": "32Gi"}


def test_lora_adapters_start_vllm_with_lora_modules(out: Rendered) -> None:
    args = _templates(_workload(out, "llama-8b"))[0]["spec"]["containers"][0]["args"]
    assert "--enable-lora" in args
    start = args.index("--lora-modules") + 1
    assert args[start : start + 2] == [
        "local-lora=/models/adapters/local",
        f"sql-lora={LORA['sql-lora']}",
    ]
    for name in ("llama-70b", "llama-405b"):
        other = _templates(_workload(out, name))[0]["spec"]["containers"][0]["args"]
        assert "--enable-lora" not in other and "--lora-modules" not in other


def test_multi_node_model_runs_ray_groups_with_probed_workers(out: Rendered) -> None:
    lws = _workload(out, "llama-405b")
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    leader, worker = (t["spec"]["containers"][0] for t in _templates(lws))
    assert _arg_after(leader["args"], "--pipeline-parallel-size") == "2"
    assert _arg_after(leader["args"], "--distributed-executor-backend") == "ray"
    # Workers serve no HTTP: their probes ask the group's Ray head through `ray health-check`.
    for probe in ("startupProbe", "livenessProbe"):
        command = worker[probe]["exec"]["command"]
        assert command[:2] == ["/bin/sh", "-c"]
        assert command[2] == 'ray health-check --address="${LWS_LEADER_ADDRESS}:6379"'
    startup = worker["startupProbe"]
    # The startup probe outlasts the worker's own join deadline (600 s by default).
    assert startup["periodSeconds"] * startup["failureThreshold"] > 600
    assert "readinessProbe" not in worker


# -- the router finds every model through one Service ---------------------------------------------


def test_one_headless_service_holds_every_models_serving_pods_and_no_worker(
    out: Rendered,
) -> None:
    (service,) = [s for s in out.of_kind("Service") if _component(s) == "engine"]
    selector = service["spec"]["selector"]
    assert service["spec"]["clusterIP"] == "None"
    assert MODEL_LABEL not in selector
    for name in EXPECTED:
        templates = _templates(_workload(out, name))
        assert _selects(selector, templates[0]["metadata"]["labels"]), name
        assert templates[0]["metadata"]["labels"][ROLE_LABEL] == "server"
        for worker in templates[1:]:
            assert not _selects(selector, worker["metadata"]["labels"])
    router = out.one("Deployment", "router")["spec"]["template"]["spec"]["containers"][0]
    dns = _env(router)["FLEET_DISCOVER_DNS"]["value"]
    assert dns == f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:8000"
    # Download and test pods never land in the router's DNS.
    for pod_labels in [j["spec"]["template"]["metadata"]["labels"] for j in out.of_kind("Job")]:
        assert not _selects(selector, pod_labels)


def test_network_policy_and_service_monitor_cover_every_model(out: Rendered) -> None:
    policy = out.one("NetworkPolicy")["spec"]
    monitors = {_component(m): m for m in out.of_kind("ServiceMonitor")}
    (service,) = [s for s in out.of_kind("Service") if _component(s) == "engine"]
    assert _selects(monitors["engine"]["spec"]["selector"]["matchLabels"], labels(service))
    for name in EXPECTED:
        for template in _templates(_workload(out, name)):
            assert _selects(policy["podSelector"]["matchLabels"], template["metadata"]["labels"])
    assert len(policy["ingress"]) == 2  # a multi-node model: Ray between engine pods


# -- disruption budgets and autoscaling -----------------------------------------------------------


def test_one_pdb_per_model_selecting_only_that_models_pods(out: Rendered) -> None:
    pdbs = [p for p in out.of_kind("PodDisruptionBudget") if _component(p) == "engine"]
    assert sorted(labels(p)[MODEL_LABEL] for p in pdbs) == sorted(EXPECTED)
    for pdb in pdbs:
        name = labels(pdb)[MODEL_LABEL]
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        selector = pdb["spec"]["selector"]["matchLabels"]
        for other in EXPECTED:
            for template in _templates(_workload(out, other)):
                assert _selects(selector, template["metadata"]["labels"]) == (other == name)


def test_router_hpa_scales_the_router_deployment_on_cpu(out: Rendered) -> None:
    router = out.one("Deployment", "router")
    hpa = out.one("HorizontalPodAutoscaler", "router")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": router["metadata"]["name"],
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert "replicas" not in router["spec"], "the HPA owns the router's replicas"
    assert router["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]


def test_engine_autoscalers_are_per_model(chart: helm.Chart) -> None:
    values = {**THREE_MODELS, "autoscaling": {"keda": {"enabled": True}}}
    scaled = render(chart, values)
    objects = scaled.of_kind("ScaledObject")
    assert sorted(labels(o)[MODEL_LABEL] for o in objects) == sorted(EXPECTED)
    for obj in objects:
        name = labels(obj)[MODEL_LABEL]
        assert obj["spec"]["scaleTargetRef"]["name"] == _workload(scaled, name)["metadata"]["name"]
        query = obj["spec"]["triggers"][0]["metadata"]["query"]
        assert f'model_name="{EXPECTED[name][1]}"' in query
        assert "replicas" not in _workload(scaled, name)["spec"]


# -- weights downloaded once ----------------------------------------------------------------------


def test_one_download_job_per_model_and_engines_wait_for_its_marker(out: Rendered) -> None:
    jobs = {labels(j)[MODEL_LABEL]: j for j in out.of_kind("Job")}
    assert sorted(jobs) == sorted(EXPECTED)
    claim = out.one("PersistentVolumeClaim")["metadata"]["name"]
    markers = set()
    for name, job in jobs.items():
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        (container,) = pod["containers"]
        env = _values(container)
        assert env["MODEL"] == EXPECTED[name][0]
        assert env["MARKER"].startswith(env["HF_HOME"] + "/.vllm-fleet/")
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == claim
        markers.add(env["MARKER"])
        # Every engine pod of the model (leader and workers) waits for this marker.
        for template in _templates(_workload(out, name)):
            (wait,) = template["spec"]["initContainers"]
            assert _env(wait)["MARKER"]["value"] == env["MARKER"]
            assert 'until [ -f "$MARKER" ]' in wait["command"][2]
            engine_volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            assert engine_volumes["model-cache"] == volumes["model-cache"]
    assert len(markers) == 3, "each model has its own marker"
    lora_env = json.loads(
        _env(jobs["llama-8b"]["spec"]["template"]["spec"]["containers"][0])["LORA_MODULES"]["value"]
    )
    assert lora_env == LORA


def test_a_changed_model_gets_a_new_job_and_marker(chart: helm.Chart, out: Rendered) -> None:
    changed = json.loads(json.dumps(THREE_MODELS))
    changed["models"][0]["model"] = "meta-llama/Llama-3.3-70B-Instruct"
    after = render(chart, changed)
    before_jobs = {labels(j)[MODEL_LABEL]: j["metadata"]["name"] for j in out.of_kind("Job")}
    after_jobs = {labels(j)[MODEL_LABEL]: j["metadata"]["name"] for j in after.of_kind("Job")}
    assert after_jobs["llama-70b"] != before_jobs["llama-70b"]
    assert after_jobs["llama-8b"] == before_jobs["llama-8b"]


@pytest.mark.parametrize("cache", ["emptyDir", "hostPath"])
def test_predownload_needs_a_shared_cache(chart: helm.Chart, cache: str) -> None:
    values = with_model(
        {"engine": {"modelCache": {"type": cache, "predownload": {"enabled": True}}}}
    )
    with pytest.raises(
        helm.HelmRenderError, match=re.escape("set engine.modelCache.type to pvc or existingClaim")
    ):
        render(chart, values)


def test_without_predownload_engines_start_at_once(chart: helm.Chart) -> None:
    plain = render(chart, {**THREE_MODELS, "engine": {"modelCache": {"type": "pvc"}}})
    assert plain.of_kind("Job") == []
    for name in EXPECTED:
        for template in _templates(_workload(plain, name)):
            assert "initContainers" not in template["spec"]


# -- non-root engines -----------------------------------------------------------------------------


def test_engines_and_download_jobs_run_as_non_root_with_a_writable_home(out: Rendered) -> None:
    pods = [t["spec"] for n in EXPECTED for t in _templates(_workload(out, n))]
    pods += [j["spec"]["template"]["spec"] for j in out.of_kind("Job")]
    for pod in pods:
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] > 0
        assert security["fsGroupChangePolicy"] == "OnRootMismatch"
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        (main,) = pod["containers"]
        home = _env(main)["HOME"]["value"]
        mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
        assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[mounts[home]]


# -- helm test, notes, dashboard ------------------------------------------------------------------


def test_helm_test_sends_a_request_to_every_model_and_adapter(out: Rendered) -> None:
    pods = [p for p in out.of_kind("Pod") if _component(p) == "test"]
    router = out.one("Service", "router")
    asked: dict[str, list[str]] = {}
    for pod in pods:
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        env = _values(pod["spec"]["containers"][0])
        assert env["BASE_URL"] == f"http://{router['metadata']['name']}:8000"
        assert env["REQUEST"] == "chat"
        asked[labels(pod)[MODEL_LABEL]] = json.loads(env["SERVED_MODELS"])
    assert asked == {
        "llama-70b": [LLAMA_70B],
        "llama-405b": ["llama-405b"],
        "llama-8b": ["llama-8b", "local-lora", "sql-lora"],
    }


def test_a_model_can_ask_for_another_request_kind_or_none(chart: helm.Chart) -> None:
    values = json.loads(json.dumps(THREE_MODELS))
    values["models"][0]["testRequest"] = "none"
    values["models"][2]["testRequest"] = "embedding"
    tests = [p for p in render(chart, values).of_kind("Pod") if _component(p) == "test"]
    kinds = {
        labels(p)[MODEL_LABEL]: _env(p["spec"]["containers"][0])["REQUEST"]["value"] for p in tests
    }
    assert kinds == {"llama-405b": "chat", "llama-8b": "embedding"}


def test_notes_list_every_model(out: Rendered) -> None:
    notes = out.notes
    assert "Models (3):" in notes
    assert f'"{LLAMA_70B}": 2 replica(s) x 4 GPU(s)' in notes
    assert '"llama-405b" (meta-llama/Llama-3.1-405B-Instruct): 1 LeaderWorkerSet group(s)' in notes
    assert 'LoRA adapters (send as "model"): local-lora, sql-lora' in notes
    assert "model-download Job" in notes


def test_dashboard_configmap_ships_the_dashboard_file(out: Rendered) -> None:
    (config_map,) = out.of_kind("ConfigMap")
    assert labels(config_map)["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    shipped = json.loads(config_map["data"]["vllm-fleet.json"])
    assert shipped == json.loads(DASHBOARD.read_text())
    assert shipped["uid"] == "vllm-fleet" and shipped["panels"]


def test_no_dashboard_configmap_unless_enabled(chart: helm.Chart) -> None:
    assert render(chart, with_model()).of_kind("ConfigMap") == []


# -- the shortcut and mistakes --------------------------------------------------------------------


def test_the_model_shortcut_keeps_its_names_and_selectors(chart: helm.Chart) -> None:
    """A release installed before `models:` upgrades without touching an immutable selector."""
    single = render(chart, with_model({"model": {"loraModules": {"a": "/adapters/a"}}}))
    deployment = single.one("Deployment", "engine")
    assert deployment["metadata"]["name"] == f"{RELEASE}-vllm-fleet-engine"
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "vllm-fleet",
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "engine",
    }
    assert "--lora-modules" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    (pdb,) = [p for p in single.of_kind("PodDisruptionBudget") if _component(p) == "engine"]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            with_model({"models": [{"name": "a", "model": "m"}]}),
            "set either model.name (one model) or models (a list of models), not both",
        ),
        (
            {"models": [{"name": "a", "model": "m"}, {"name": "a", "model": "n"}]},
            'models[1].name: "a" is used twice',
        ),
        (
            {"models": [{"name": "a", "model": "m"}, {"name": "b", "model": "m"}]},
            'models[1]: served name "m" is used twice; set models[].servedName',
        ),
    ],
)
def test_ambiguous_model_lists_are_refused_with_the_fix(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError) as caught:
        render(chart, values)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "a"}, "missing property 'model'"),
        ({"model": "m"}, "missing property 'name'"),
        ({"name": "Big_Model", "model": "m"}, "at '/models/0/name'"),
        ({"name": "headless", "model": "m"}, "at '/models/0/name'"),
        ({"name": "a", "model": "m", "replica": 2}, "additional properties 'replica' not allowed"),
        ({"name": "a", "model": "m", "tensorParallelSize": 0}, "at '/models/0/tensorParallelSize'"),
        ({"name": "a", "model": "m", "loraModules": {"x": "a b"}}, "at '/models/0/loraModules/x'"),
        ({"name": "a", "model": "m", "testRequest": "ping"}, "at '/models/0/testRequest'"),
        (
            {"name": "a", "model": "m", "multiNode": {"enable": True}},
            "additional properties 'enable' not allowed",
        ),
    ],
)
def test_schema_rejects_bad_model_entries_naming_them(
    chart: helm.Chart, entry: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema({"models": [entry]})
    assert message in str(caught.value)


def test_router_hpa_without_a_cpu_request_is_refused_with_the_fix(chart: helm.Chart) -> None:
    values = with_model(
        {"router": {"autoscaling": {"enabled": True}, "resources": {"requests": None}}}
    )
    with pytest.raises(helm.HelmRenderError) as caught:
        render(chart, values)
    assert "set router.resources.requests.cpu" in str(caught.value)
