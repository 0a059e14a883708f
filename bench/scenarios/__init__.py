"""The benchmark scenarios, one module each, and the registry `python -m bench` runs from.

Every scenario starts its replicas, runs each router of its line-up through the same seeded
load and returns a `Section` (tables, plot data, notes) for the report. Scenarios never import
matplotlib: plots travel as `Plot` data and `bench.plots` draws them, so the tests can import
every scenario from the project's own venv.

Adding scenario N:

1. Write `bench/scenarios/sN_<what>.py` with `KEY = "N"`, its line-ups `PEERS` and
   `QUICK_PEERS` (keys of bench.peers.PEER_KEYS) and `async def run_scenario(opts: Options)
   -> Section`. Start replicas with `bench.replicas` inside `harness.started(...)`, run each
   peer with `harness.measure(key, opts, fleet, load)` over `harness.line_up(opts, PEERS,
   QUICK_PEERS)`, and build tables with `bench.scenarios.tables` (`latency_table` fits any
   open-loop run). The heterogeneous fleet and its calibrated traffic are in
   `bench.scenarios.heterogeneous`; new traffic shapes belong in `bench.load`.
2. That is all the registry needs: every `sN_*.py` module here is found by its name. Add N to
   `FULL_DEFAULT` below if a plain `python -m bench` should run it.
3. `python -m bench --quick --scenarios N` tries it (results under bench/.work); the full run
   stores bench/results/sN.json, and `python -m bench report` puts it on docs/benchmarks.md.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any

from bench.scenarios.harness import Options, finish
from bench.section import Section

Scenario = Callable[[Options], Coroutine[Any, Any, Section]]

#: A scenario module's name: `s<key>_<what>`.
SCENARIO_MODULE = re.compile(r"s(\d+)_\w+")


def _scenario_modules() -> list[ModuleType]:
    """Every `sN_*` module of this package, by N; each must declare `KEY = "N"`."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        match = SCENARIO_MODULE.fullmatch(info.name)
        if match is None:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if getattr(module, "KEY", None) != match.group(1):
            raise ImportError(f"{module.__name__}: KEY must be {match.group(1)!r}")
        found.append(module)
    return sorted(found, key=lambda m: int(m.KEY))


MODULES = _scenario_modules()
#: Every scenario by its key on the command line.
SCENARIOS: dict[str, Scenario] = {m.KEY: m.run_scenario for m in MODULES}

#: What `--quick` runs unless --scenarios says otherwise.
QUICK_DEFAULT = ("1", "5")
#: Scenarios 7 and 12 need real vLLM and a few minutes more: run them by name (`--scenarios 7,12`).
FULL_DEFAULT = ("1", "2", "3", "4", "5", "6")

__all__ = ["FULL_DEFAULT", "QUICK_DEFAULT", "SCENARIOS", "Options", "Scenario", "finish"]
