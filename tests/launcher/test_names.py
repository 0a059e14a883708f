"""Names a reader guesses right: one module per subcommand, one class per name.

A reader looking for `vllm-fleet down` opens commands/down.py; one looking for the router's
configuration finds one ``RouterConfig``. These were once commands/up.py (holding status and
down too) and two RouterConfig classes (the router's, and the launcher's router: section).
"""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

from vllm_fleet.launcher import cli

ROOT = Path(__file__).resolve().parents[2]


def _subcommands_of(module_name: str) -> list[str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    importlib.import_module(module_name).register(sub)
    return list(sub.choices)


def test_every_subcommand_lives_in_the_module_named_after_it() -> None:
    for module_name in cli.COMMAND_MODULES:
        parts = module_name.split(".")
        expected = parts[-2] if parts[-1] == "cli" else parts[-1]
        assert _subcommands_of(module_name) == [expected], module_name


def _classes(*paths: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append(str(path.relative_to(ROOT)))
    return found


def test_the_launchers_config_types_are_not_named_like_the_routers() -> None:
    """fleet.yaml's router: section is not the router's configuration; its type must not be
    mistaken for vllm_fleet.router.config.RouterConfig."""
    launcher_config = _classes(ROOT / "launcher" / "config.py")
    router = _classes(*sorted((ROOT / "router").rglob("*.py")))
    assert sorted(set(launcher_config) & set(router)) == []


def test_no_class_name_is_defined_twice_in_the_launcher() -> None:
    """The simulator (launcher/sim) stands in for vLLM and keeps its own types apart."""
    paths = [p for p in sorted((ROOT / "launcher").rglob("*.py")) if "sim" not in p.parts]
    twice = {name: where for name, where in _classes(*paths).items() if len(where) > 1}
    assert twice == {}


#: a module longer than this holds more than a reader looks for in one place.
MAX_LINES = 500
#: modules still over the limit; an entry must leave once its module is split (issue 16).
OVER_LIMIT_TODAY: set[str] = set()


def test_launcher_modules_stay_short_enough_to_find_things_in() -> None:
    lengths = {
        str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
        for path in sorted((ROOT / "launcher").rglob("*.py"))
    }
    over = {name for name, count in lengths.items() if count > MAX_LINES}
    assert over - OVER_LIMIT_TODAY == set(), {n: lengths[n] for n in over}
    assert over >= OVER_LIMIT_TODAY, "split already: remove it from OVER_LIMIT_TODAY"
