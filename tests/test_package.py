"""The package users install (issue 16): `pip install vllm-fleet` puts one import name,
vllm_fleet, into site-packages (top-level `router` or `launcher` packages collide with any other
project's), and the wheel alone runs the CLI.

Built as a release is: an sdist from a copy of the files it ships, then the wheel from the
unpacked sdist (so a file the sdist forgets fails here). The wheel goes into a fresh venv and runs
from an empty directory outside the repository, with no PYTHONPATH: every import the CLI makes
comes from the wheel. The venv sees the project venv's site-packages through a .pth file for the
*dependencies* (aiohttp, ...), so the test needs no network; the project's own editable install
there is inert (its import hook is set up by a .pth file that a path added this way never runs),
and a test below checks that vllm_fleet is imported from the new venv.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import tomllib

from tests.support.ports import free_port
from tests.support.procs import ChildProcess, wait_http

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "vllm_fleet"
#: repository folder -> import name (pyproject.toml [tool.setuptools.package-dir]).
FOLDERS = {"router": "vllm_fleet.router", "launcher": "vllm_fleet.launcher"}
#: what the sdist ships, copied to a scratch directory: building in the working tree would
#: write build/ and *.egg-info there.
SDIST_INPUTS = ("pyproject.toml", "README.md", *FOLDERS)
LLAMA_70B = ROOT / "tests" / "launcher" / "models" / "Llama-3.1-70B"
STEP_S = 300  # bound of each build or install step


def _run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_S, check=False
    )
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result.stdout


def _backend(hook: str, source: Path, out: Path) -> Path:
    """Call setuptools' PEP 517 hook (what `python -m build` calls) in a child process."""
    out.mkdir(parents=True, exist_ok=True)
    code = f"import sys, setuptools.build_meta as b; print(b.{hook}(sys.argv[1]))"
    name = _run([sys.executable, "-c", code, str(out)], cwd=source).strip().splitlines()[-1]
    return out / name


def _source_modules(folder: str) -> set[str]:
    """Every .py file of a repository folder, as a path under its import name."""
    base = ROOT / folder
    prefix = FOLDERS[folder].replace(".", "/")
    return {
        f"{prefix}/{p.relative_to(base).as_posix()}"
        for p in base.rglob("*.py")
        if "__pycache__" not in p.parts
    }


@dataclass(frozen=True)
class Installed:
    sdist: Path
    wheel: Path
    venv: Path
    #: an empty directory outside the repository: the working directory of every command.
    outside: Path

    @property
    def env(self) -> dict[str, str]:
        """No PYTHONPATH, no user site: imports come from the venv alone."""
        keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
        path = f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"
        return {**keep, "PATH": path, "PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1"}

    @property
    def cli(self) -> str:
        return str(self.venv / "bin" / "vllm-fleet")

    def run(self, *argv: str) -> str:
        return _run(list(argv), cwd=self.outside, env=self.env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("package")
    source = tmp / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SDIST_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy(ROOT / name, source / name)
    sdist = _backend("build_sdist", source, tmp / "dist")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    wheel = _backend("build_wheel", unpacked, tmp / "dist")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=tmp).strip()  # fmt: skip
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (Path(site) / "_project_dependencies.pth").write_text("\n".join(deps) + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)],
        cwd=tmp,
    )  # fmt: skip
    outside = tmp / "elsewhere"
    outside.mkdir()
    yield Installed(sdist, wheel, venv, outside)


def test_pyproject_lists_every_package() -> None:
    """setuptools installs only the packages listed: a new subpackage left out of the list would
    be missing from the wheel (and `import` would fail only for users)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = config["tool"]["setuptools"]
    assert setuptools["package-dir"] == {v: k for k, v in FOLDERS.items()}
    in_tree = sorted(
        ".".join([NAMESPACE, *init.parent.relative_to(ROOT).parts])
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
        if "__pycache__" not in init.parts
    )
    assert sorted(setuptools["packages"]) == in_tree, "run python .ci/rename-namespace.py"
    assert config["project"]["scripts"] == {"vllm-fleet": "vllm_fleet.launcher.cli:main"}


def test_code_imports_the_namespace_only() -> None:
    """`from router.x import y` still runs inside the repository (pytest puts its root on
    sys.path) but makes a second copy of every module, and fails once installed."""
    offenders = []
    for folder in (*FOLDERS, "tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in path.parts or ".env" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                offenders += [
                    f"{path.relative_to(ROOT)}:{node.lineno}: {name}"
                    for name in names
                    if name.split(".")[0] in FOLDERS
                ]
    assert not offenders, "old import names (python .ci/rename-namespace.py fixes them):\n" + (
        "\n".join(offenders)
    )


def test_sdist_ships_what_the_wheel_is_built_from(installed: Installed) -> None:
    with tarfile.open(installed.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md"} <= names
    for folder in FOLDERS:
        shipped = {n for n in names if n.startswith(f"{folder}/") and n.endswith(".py")}
        expected = {
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / folder).rglob("*.py")
            if "__pycache__" not in p.parts
        }
        assert shipped == expected


def test_wheel_installs_one_namespace(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {NAMESPACE, dist_info}
    assert f"{NAMESPACE}/__init__.py" not in names  # an implicit namespace package
    modules = {n for n in names if n.endswith(".py")}
    assert modules == _source_modules("router") | _source_modules("launcher")
    assert "vllm-fleet = vllm_fleet.launcher.cli:main" in entry_points


def test_installed_package_imports_from_the_venv(installed: Installed) -> None:
    probe = (
        "import importlib.util, json, vllm_fleet.router.app, vllm_fleet.launcher.cli as c;"
        "print(json.dumps({'file': c.__file__,"
        " 'router': importlib.util.find_spec('router') is not None,"
        " 'launcher': importlib.util.find_spec('launcher') is not None}))"
    )
    found = json.loads(installed.run(str(installed.venv / "bin" / "python"), "-c", probe))
    assert Path(found["file"]).is_relative_to(installed.venv), found
    assert not Path(found["file"]).is_relative_to(ROOT), found
    assert found["router"] is False and found["launcher"] is False, found


def test_installed_cli_help_and_plan(installed: Installed) -> None:
    usage = installed.run(installed.cli, "--help")
    for command in ("plan", "up", "sim", "router", "compose"):
        assert command in usage
    plan = installed.run(installed.cli, "plan", "--model", str(LLAMA_70B), "--gpus", "8x80GB")
    assert "Plan: 2 replicas x TP4, max_model_len 131072" in plan
    assert "replica-1  GPUs 4,5,6,7  port 8002" in plan


async def test_installed_sim_behind_installed_router(installed: Installed) -> None:
    """A simulator and a router from the wheel, one completion through both, both stopped."""
    sim_port, router_port = free_port(), free_port()
    logs = installed.outside / "logs"
    sim_url, router_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{router_port}"
    sim = ChildProcess(
        [installed.cli, "sim", "--host", "127.0.0.1", "--port", str(sim_port), "--model", "m",
         "--step-ms", "1"],
        logs / "sim.log", env=installed.env, cwd=installed.outside,
    )  # fmt: skip
    router = None
    try:
        await wait_http(f"{sim_url}/health", 30.0, sim)
        router = ChildProcess(
            [installed.cli, "router", "--host", "127.0.0.1", "--port", str(router_port),
             "--backend", sim_url, "--health-interval", "0.2"],
            logs / "router.log", env=installed.env, cwd=installed.outside,
        )  # fmt: skip
        await wait_http(f"{router_url}/ready", 30.0, router)
        body = {"model": "m", "prompt": "hello", "max_tokens": 4}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.post(f"{router_url}/v1/completions", json=body) as response,
        ):
            assert response.status == 200, await response.text()
            answer = await response.json()
        assert answer["object"] == "text_completion"
        assert answer["choices"][0]["text"]
        assert answer["usage"]["completion_tokens"] == 4
    finally:
        if router is not None:
            router.stop()
        sim.stop()
    assert router is not None
    assert router.proc.returncode is not None and sim.proc.returncode is not None
