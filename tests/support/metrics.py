"""Prometheus metrics as tests and the benchmark read them: scrape `/metrics`, sum samples.

    samples = await scrape_metrics(router.url)
    assert metric_value(samples, "vllm_fleet_upstream_failures_total", replica=url) == 1

Names are sample names as exposed (`..._total` for counters, `..._sum` / `..._count` for
histograms); labels not given match any value, and every matching sample is summed.
"""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

SCRAPE_TIMEOUT_S = 5.0


def parse_samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (one per exposed line)."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


async def scrape_metrics(url: str, session: aiohttp.ClientSession | None = None) -> list[Sample]:
    """`GET {url}/metrics`, parsed. Pass `session` to reuse connections when polling often."""
    if session is None:
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as own:
            return await scrape_metrics(url, own)
    async with session.get(f"{url}/metrics") as response:
        response.raise_for_status()
        return parse_samples(await response.text())


def metric_value(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called `name` (e.g. 'vllm:generation_tokens_total') with `labels`."""
    return sum(
        sample.value
        for sample in samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )
