"""Draw docs/img/batch_throughput.png from bench/results/batch_sweep*.json.

    bench/.env/bin/python -m bench.batch_plot

Throughput and median latency against --max-inflight for each stored sweep (the fixed limits
as a line, `auto` as points at the limit it ended with): the curve seed notebook 003 draws for
batch size, here for a client's concurrency. Separate from bench.batch_sweep because drawing
needs matplotlib (bench/.env only) and running needs the project's venv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.plots import draw
from bench.section import Plot

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("batch_sweep.json", "batch_sweep_vllm.json")


def build_plot(results: list[dict[str, object]]) -> Plot:
    series: dict[str, list[tuple[float, float]]] = {}
    latency: dict[str, list[tuple[float, float]]] = {}
    for result in results:
        fleet = str(result["fleet"])
        rows = result["rows"]
        assert isinstance(rows, list)
        fixed = sorted(
            (float(r["max_inflight"]), r) for r in rows if str(r["max_inflight"]).isdigit()
        )
        series[f"{fleet}: fixed"] = [(x, r["output_tokens_per_s"]) for x, r in fixed]
        latency[f"{fleet}: fixed"] = [(x, r["latency_p50_s"]) for x, r in fixed]
        auto = [r for r in rows if not str(r["max_inflight"]).isdigit()]
        for r in auto:  # one point each: fresh router and warm router are different runs
            label = f"{fleet}: {r['max_inflight']}"
            series[label] = [(float(r["final_limit"]), r["output_tokens_per_s"])]
            latency[label] = [(float(r["final_limit"]), r["latency_p50_s"])]
    commits = ", ".join(sorted({str(r["commit"]) for r in results}))
    return Plot(
        kind="sweep",
        filename="batch_throughput.png",
        title=f"vllm-fleet batch: throughput and latency against --max-inflight ({commits})",
        series=series,
        xlabel="requests in flight (auto: where it ended)",
        ylabel="output tokens/s",
        series2=latency,
        ylabel2="p50 latency (s)",
    )


def main() -> int:
    results = []
    for name in SOURCES:
        path = REPO / "bench" / "results" / name
        if path.exists():
            results.append(json.loads(path.read_text()))
    if not results:
        print("no bench/results/batch_sweep*.json: run python -m bench.batch_sweep first")
        return 1
    print(draw(build_plot(results), REPO / "docs" / "img"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
