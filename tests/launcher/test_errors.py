"""The launcher reports its mistakes with its own error type, not the router's."""

from __future__ import annotations

import ast
from pathlib import Path

from vllm_fleet.launcher import cli
from vllm_fleet.launcher.errors import ConfigError
from vllm_fleet.router.errors import ConfigError as RouterConfigError

LAUNCHER = Path(__file__).resolve().parents[2] / "launcher"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_only_the_cli_knows_the_routers_error_type() -> None:
    """The CLI hosts `vllm-fleet router`, so it catches both types; every other launcher
    module (planner, runtimes, tiny model, simulator) raises
    vllm_fleet.launcher.errors.ConfigError."""
    importers = sorted(
        str(path.relative_to(LAUNCHER))
        for path in LAUNCHER.rglob("*.py")
        if "vllm_fleet.router.errors" in _imported_modules(path)
    )
    assert importers == ["cli.py"]


def test_the_cli_turns_both_error_types_into_one_line() -> None:
    assert set(cli.CONFIG_ERRORS) == {ConfigError, RouterConfigError}
