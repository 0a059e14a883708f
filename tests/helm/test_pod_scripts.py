"""The scripts the chart's pods run, run for real: the `helm test` pod's request to every model
through a real router over simulators, the download Job's script with a stand-in
`huggingface_hub`, the engines' wait for its marker, and the Ray worker's probe with a stand-in
`ray`. Rendering alone would not notice a script that cannot succeed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helm.render import Obj, Rendered, labels, load_chart, render
from tests.support.router import running_router
from tests.support.sim import running_sim

pytestmark = pytest.mark.timeout(120)

MODEL_LABEL = "vllm-fleet.io/model"
VALUES: dict[str, Any] = {
    "models": [
        {"name": "chat", "model": "org/chat-model", "loraModules": {"sql-lora": "org/sql-lora"}},
        {"name": "embed", "model": "/models/embedder", "testRequest": "embedding"},
        {"name": "big", "model": "org/big", "multiNode": {"enabled": True}},
    ],
    "engine": {"modelCache": {"type": "pvc", "predownload": {"enabled": True}}},
}


@pytest.fixture(scope="module")
def out() -> Iterator[Rendered]:
    with load_chart() as chart:
        yield render(chart, VALUES)


def _of_model(out: Rendered, kind: str, name: str) -> Obj:
    (found,) = [o for o in out.of_kind(kind) if labels(o).get(MODEL_LABEL) == name]
    return found


def _env_values(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _test_container(out: Rendered, name: str) -> dict[str, Any]:
    pod = _of_model(out, "Pod", name)
    container: dict[str, Any] = pod["spec"]["containers"][0]
    return container


async def _run_test_pod(
    container: dict[str, Any], base_url: str, timeout_s: int
) -> tuple[int, str]:
    """Run the test pod's command as the pod would, with the router at ``base_url``."""
    env = {**_env_values(container), "BASE_URL": base_url, "TIMEOUT_S": str(timeout_s)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *container["command"][1:],
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=timeout_s + 30)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_helm_test_pods_get_an_answer_from_every_model_and_adapter(out: Rendered) -> None:
    chat_container = _test_container(out, "chat")
    embed_container = _test_container(out, "embed")
    assert chat_container["command"][0] == "python3"
    async with (
        running_sim(model="org/chat-model", lora_modules=(("sql-lora", "/adapters/sql"),)) as chat,
        running_sim(model="/models/embedder") as embed,
        running_router([chat.url, embed.url]) as router,
    ):
        code, output = await _run_test_pod(chat_container, router.url, 30)
        assert code == 0, output
        assert "ok: org/chat-model answered a chat request" in output
        assert "ok: sql-lora answered a chat request" in output
        code, output = await _run_test_pod(embed_container, router.url, 30)
        assert code == 0, output
        assert "ok: /models/embedder answered a embedding request" in output


async def test_helm_test_pod_fails_naming_a_model_the_router_does_not_serve(
    out: Rendered,
) -> None:
    async with running_sim(model="something-else") as sim, running_router([sim.url]) as router:
        code, output = await _run_test_pod(_test_container(out, "chat"), router.url, 2)
    assert code == 1
    assert "FAIL" in output and "'org/chat-model' not in /v1/models" in output


# -- the download Job and the engines' wait ---------------------------------------------------


FAKE_HUB = """
import json, os
def snapshot_download(repo_id, ignore_patterns=None):
    with open(os.environ["HUB_LOG"], "a") as log:
        log.write(json.dumps([repo_id, ignore_patterns]) + "\\n")
    return "/cache/" + repo_id
"""


def _run_download(job: Obj, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    fake = tmp_path / "fake"
    (fake / "huggingface_hub").mkdir(parents=True, exist_ok=True)
    (fake / "huggingface_hub" / "__init__.py").write_text(FAKE_HUB)
    env = _env_values(container)
    cache = tmp_path / "cache"
    marker = Path(str(cache) + env["MARKER"].removeprefix(env["HF_HOME"]))
    env.update(
        HF_HOME=str(cache), MARKER=str(marker), PYTHONPATH=str(fake), HUB_LOG=str(tmp_path / "hub")
    )
    result = subprocess.run(
        [sys.executable, *container["command"][1:]],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result, marker


def _downloads(tmp_path: Path) -> list[list[Any]]:
    log = tmp_path / "hub"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_download_job_fetches_the_model_and_hub_adapters_once_then_marks_done(
    out: Rendered, tmp_path: Path
) -> None:
    job = _of_model(out, "Job", "chat")
    result, marker = _run_download(job, tmp_path)
    assert result.returncode == 0, result.stderr
    assert _downloads(tmp_path) == [
        ["org/chat-model", ["original/*"]],
        ["org/sql-lora", ["original/*"]],
    ]
    assert marker.read_text() == "org/chat-model\n"
    again, _ = _run_download(job, tmp_path)
    assert again.returncode == 0 and "already downloaded" in again.stdout
    assert len(_downloads(tmp_path)) == 2, "a finished download is not repeated"


def test_download_job_skips_a_local_model_path_but_still_marks_it(
    out: Rendered, tmp_path: Path
) -> None:
    result, marker = _run_download(_of_model(out, "Job", "embed"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert _downloads(tmp_path) == []
    assert marker.exists()


def _wait_script(out: Rendered, name: str, kind: str) -> dict[str, Any]:
    workload = _of_model(out, kind, name)
    if kind == "Deployment":
        spec = workload["spec"]["template"]["spec"]
    else:
        spec = workload["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    (wait,) = spec["initContainers"]
    container: dict[str, Any] = wait
    return container


def _run_wait(
    container: dict[str, Any], marker: Path, tmp_path: Path, deadline: int | None
) -> subprocess.CompletedProcess[str]:
    script = container["command"][2]
    if deadline is not None:
        script = script.replace("+ 7200 ))", f"+ {deadline} ))")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sleep").chmod(0o755)
    env = {
        **_env_values(container),
        "MARKER": str(marker),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    return subprocess.run(
        ["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(("name", "kind"), [("chat", "Deployment"), ("big", "LeaderWorkerSet")])
def test_engines_start_once_the_marker_exists_and_give_up_at_their_deadline(
    out: Rendered, tmp_path: Path, name: str, kind: str
) -> None:
    container = _wait_script(out, name, kind)
    marker = tmp_path / "marker"
    stopped = _run_wait(container, marker, tmp_path, deadline=0)
    assert stopped.returncode == 1
    assert "are not downloaded after 7200s" in stopped.stderr
    assert "-dl-" in stopped.stderr  # names the Job to look at
    marker.write_text("done\n")
    started = _run_wait(container, marker, tmp_path, deadline=None)
    assert started.returncode == 0, started.stderr


# -- the Ray worker's probe ---------------------------------------------------------------------


@pytest.mark.parametrize("ray_exit", [0, 1])
def test_worker_probe_passes_exactly_when_ray_health_check_does(
    out: Rendered, tmp_path: Path, ray_exit: int
) -> None:
    lws = _of_model(out, "LeaderWorkerSet", "big")
    worker = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "ray.log"
    (bin_dir / "ray").write_text(f'#!/bin/sh\necho "ray $*" >> {log}\nexit {ray_exit}\n')
    (bin_dir / "ray").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LWS_LEADER_ADDRESS": "big-0.big.llm"}
    for probe in ("startupProbe", "livenessProbe"):
        result = subprocess.run(
            worker[probe]["exec"]["command"], env=env, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == ray_exit, probe
    assert log.read_text().splitlines() == ["ray health-check --address=big-0.big.llm:6379"] * 2
