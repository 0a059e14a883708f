"""Measure a real vLLM server and fit the simulator's step-time law to it (docs/simulator.md).

    python -m vllm_fleet.launcher.sim.calibrate --url http://127.0.0.1:8000 --model tiny-llama

Why it exists: the simulator's law (vllm_fleet.launcher.sim.engine) must have the shape of vLLM's,
not of our balancer's. Three kinds of points are measured, with new random token ids as prompts
every run (no prefix-cache hits unless wanted) and `ignore_eos` (exact lengths):

- prefill: one request at a time, prompt P tokens, 1 output token; the engine's own
  `vllm:request_prefill_time_seconds` (scheduled to first token: one step computing P tokens);
- decode: n requests at once, prompt L tokens, 64 output tokens each, sent after the same
  prompts were prefilled once (so they hit the prefix cache, start together, and every step
  after their first token is a pure decode step); the engine's mean
  `vllm:inter_token_latency_seconds`;
- prefix: the same prompt twice, the second prefill computing only what the cache lacks (its
  new tokens attend to the cached ones).

The fit is least squares (relative errors) over all of them for
``step = t0 + t_seq * requests + t_tok * tokens + t_kv * kv_read + t_pair * pairs`` (the
simulator's law: kv_read = the context each decode reads, pairs = a prefill's query-key pairs),
reported with the measured points and the simulator constants the shape gives for a replica
whose fixed step cost is `--step-ms`.

The load is short (about 30 s a round on 2 cores, `--rounds` rounds) and sequential. Other work
on the machine can only add time, so a prefill point is the minimum over repeats and rounds; a
decode point is the median over rounds (see `_median_decode`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

#: Output tokens of each decode measurement.
DECODE_TOKENS = 64
#: Prompt lengths of the prefill points and (batch, context) pairs of the decode points.
PREFILL_LENGTHS = (16, 128, 256, 512, 768, 1024, 1536, 1900)
DECODE_POINTS = (
    (1, 16), (2, 16), (4, 16), (8, 16), (16, 16), (32, 16), (64, 16),
    (1, 1000), (1, 1900), (8, 1000), (8, 1900), (32, 1000), (32, 1900),
)  # fmt: skip
PREFILL_REPEATS = 3
#: Token ids drawn for prompts (the tiny model's vocabulary has 512; ids 0-9 are special).
VOCAB = (10, 500)
REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class PrefillPoint:
    prompt_tokens: int
    seconds: float


@dataclass(frozen=True)
class DecodePoint:
    batch: int
    context: int
    step_seconds: float


@dataclass(frozen=True)
class PrefixPoint:
    """The same prompt twice: the second prefill computes only what the cache lacks."""

    prompt_tokens: int
    hit_tokens: int
    cold_seconds: float
    warm_seconds: float


@dataclass(frozen=True)
class Fit:
    """Seconds: t0 per step, t_seq per request, t_tok per computed token, t_kv per KV token
    read (a request reads its whole context once per step)."""

    t0: float
    t_seq: float
    t_tok: float
    t_kv: float
    #: per query-key pair of a prefill's attention
    t_pair: float = 0.0

    def step(self, requests: float, tokens: float, kv_read: float, pairs: float = 0.0) -> float:
        return (
            self.t0
            + self.t_seq * requests
            + self.t_tok * tokens
            + self.t_kv * kv_read
            + self.t_pair * pairs
        )


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(length)]


async def _metric_sum_count(
    session: aiohttp.ClientSession, url: str, name: str
) -> tuple[float, float]:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_sum":
                total += sample.value
            elif sample.name == f"{name}_count":
                count += sample.value
    return total, count


async def _complete(
    session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], max_tokens: int
) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    async with session.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        await response.read()


async def measure_prefill(
    session: aiohttp.ClientSession, url: str, model: str, lengths: Sequence[int], rng: random.Random
) -> list[PrefillPoint]:
    points: list[PrefillPoint] = []
    name = "vllm:request_prefill_time_seconds"
    for length in lengths:
        samples: list[float] = []
        for _ in range(PREFILL_REPEATS):
            before, _ = await _metric_sum_count(session, url, name)
            await _complete(session, url, model, _prompt(rng, length), 1)
            after, _ = await _metric_sum_count(session, url, name)
            samples.append(after - before)
        points.append(PrefillPoint(length, min(samples)))
        print(f"  prefill {length:5d} tokens: {1000 * points[-1].seconds:8.2f} ms", flush=True)
    return points


async def _counter(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


async def measure_prefix(
    session: aiohttp.ClientSession, url: str, model: str, lengths: Sequence[int], rng: random.Random
) -> list[PrefixPoint]:
    """A check of the prefix-cache model, not part of the fit."""
    points: list[PrefixPoint] = []
    name = "vllm:request_prefill_time_seconds"
    for length in lengths:
        prompt = _prompt(rng, length)
        times: list[float] = []
        hits_before = await _counter(session, url, "vllm:prefix_cache_hits_total")
        for _ in range(2):
            before, _ = await _metric_sum_count(session, url, name)
            await _complete(session, url, model, prompt, 1)
            after, _ = await _metric_sum_count(session, url, name)
            times.append(after - before)
        hits = await _counter(session, url, "vllm:prefix_cache_hits_total") - hits_before
        points.append(PrefixPoint(length, int(hits), times[0], times[1]))
        print(
            f"  prefix {length:5d} tokens, {int(hits):5d} cached: "
            f"{1000 * times[0]:8.2f} ms cold, {1000 * times[1]:8.2f} ms warm",
            flush=True,
        )
    return points


async def measure_decode(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    pairs: Sequence[tuple[int, int]],
    rng: random.Random,
) -> list[DecodePoint]:
    points: list[DecodePoint] = []
    name = "vllm:inter_token_latency_seconds"
    for batch, context in pairs:
        prompts = [_prompt(rng, context) for _ in range(batch)]
        # Prefill them first (1 token each): then the measured requests hit the prefix cache,
        # start together and their steps are pure decode steps, however long the prompts.
        await asyncio.gather(*(_complete(session, url, model, p, 1) for p in prompts))
        before, before_count = await _metric_sum_count(session, url, name)
        await asyncio.gather(*(_complete(session, url, model, p, DECODE_TOKENS) for p in prompts))
        after, after_count = await _metric_sum_count(session, url, name)
        points.append(DecodePoint(batch, context, (after - before) / (after_count - before_count)))
        print(
            f"  decode batch {batch:3d} context {context:5d}: "
            f"{1000 * points[-1].step_seconds:8.2f} ms/step",
            flush=True,
        )
    return points


def _pairs(computed: int, tokens: int) -> float:
    return tokens * computed + tokens * (tokens + 1) / 2


def _rows(
    prefill: Sequence[PrefillPoint], decode: Sequence[DecodePoint], prefix: Sequence[PrefixPoint]
) -> list[tuple[str, list[float], float]]:
    """(label, [1, requests, tokens, kv_read, pairs], seconds) of every measured step."""
    rows: list[tuple[str, list[float], float]] = []
    for p in prefill:
        n = p.prompt_tokens
        rows.append((f"prefill {n}", [1.0, 1.0, n, 0.0, _pairs(0, n)], p.seconds))
    for x in prefix:
        new = x.prompt_tokens - x.hit_tokens
        pairs = _pairs(x.hit_tokens, new)
        rows.append((f"prefix {x.prompt_tokens}", [1.0, 1.0, new, 0.0, pairs], x.warm_seconds))
    for d in decode:
        # mean context over the decode steps: the prompt plus about half the output
        context = d.context + DECODE_TOKENS / 2
        row = [1.0, d.batch, d.batch, d.batch * context, 0.0]
        rows.append((f"decode {d.batch}x{d.context}", row, d.step_seconds))
    return rows


def fit(
    prefill: Sequence[PrefillPoint],
    decode: Sequence[DecodePoint],
    prefix: Sequence[PrefixPoint] = (),
) -> Fit:
    """Least squares, relative error (every point counts alike), coefficients kept >= 0."""
    rows = _rows(prefill, decode, prefix)
    a = np.array([row for _, row, _ in rows])
    b = np.array([seconds for _, _, seconds in rows])
    weights = 1.0 / b
    width = a.shape[1]
    active = list(range(width))
    coef = np.zeros(width)
    for _ in range(width):  # drop a coefficient that comes out negative and refit (small NNLS)
        solution, *_ = np.linalg.lstsq(a[:, active] * weights[:, None], b * weights, rcond=None)
        coef = np.zeros(width)
        coef[active] = solution
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            break
        active = [i for i in active if i not in negative]
    return Fit(*(float(c) for c in coef))


def sim_constants(result: Fit, step_ms: float) -> dict[str, float]:
    """The simulator flags that give a replica with fixed step cost `step_ms` this shape."""
    per_t0 = step_ms / result.t0  # seconds of vLLM -> simulated milliseconds
    return {
        "step_ms": step_ms,
        "batch_slowdown": result.t_seq / result.t0,
        "prefill_ms_per_token": result.t_tok * per_t0,
        "attention_ms_per_ktoken": 1000.0 * result.t_kv * per_t0,
        "prefill_attention_ms_per_mpair": 1e6 * result.t_pair * per_t0,
        "prefill_token_fraction": result.t_tok / result.t0,
        "attention_ktoken_fraction": 1000.0 * result.t_kv / result.t0,
        "prefill_mpair_fraction": 1e6 * result.t_pair / result.t0,
    }


async def _max_model_len(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(f"{url}/v1/models") as response:
        response.raise_for_status()
        cards = (await response.json())["data"]
    return int(cards[0].get("max_model_len") or 2048)


def _min_prefill(rounds: Sequence[Sequence[PrefillPoint]]) -> list[PrefillPoint]:
    return [
        PrefillPoint(points[0].prompt_tokens, min(p.seconds for p in points))
        for points in zip(*rounds, strict=True)
    ]


def _median_decode(rounds: Sequence[Sequence[DecodePoint]]) -> list[DecodePoint]:
    """The median, not the minimum: on a loaded machine a batch's requests can reach the
    engine one after another, and an unbatched round reads as a spuriously fast one."""
    return [
        DecodePoint(
            points[0].batch, points[0].context, statistics.median(p.step_seconds for p in points)
        )
        for points in zip(*rounds, strict=True)
    ]


async def calibrate(
    url: str, model: str, seed: int, step_ms: float, rounds: int = 3
) -> dict[str, object]:
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    # A new connection per request: uvicorn closes idle keep-alive connections after 5 s, and
    # a request sent on one just then fails with "Server disconnected".
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        limit = await _max_model_len(session, url) - DECODE_TOKENS - 8
        lengths = [n for n in PREFILL_LENGTHS if n <= limit]
        pairs = [(b, min(c, limit)) for b, c in DECODE_POINTS]
        await _complete(session, url, model, _prompt(rng, 16), 4)  # warm-up
        prefill_rounds: list[list[PrefillPoint]] = []
        decode_rounds: list[list[DecodePoint]] = []
        prefix_rounds: list[list[PrefixPoint]] = []
        for index in range(rounds):
            print(f"round {index + 1}/{rounds}: prefix cache, same prompt twice", flush=True)
            prefix_rounds.append(await measure_prefix(session, url, model, lengths[-3:], rng))
            print(f"round {index + 1}/{rounds}: prefill, one request at a time", flush=True)
            prefill_rounds.append(await measure_prefill(session, url, model, lengths, rng))
            print(f"round {index + 1}/{rounds}: decode, n streams at once", flush=True)
            decode_rounds.append(await measure_decode(session, url, model, pairs, rng))
    prefill = _min_prefill(prefill_rounds)
    decode = _median_decode(decode_rounds)
    prefix: list[PrefixPoint] = []
    for points in zip(*prefix_rounds, strict=True):
        # a pair whose first request hit too (a prompt this server saw before) says nothing
        fair = [p for p in points if p.hit_tokens < p.prompt_tokens] or list(points)
        prefix.append(
            PrefixPoint(
                fair[0].prompt_tokens,
                fair[0].hit_tokens,
                min(p.cold_seconds for p in fair),
                min(p.warm_seconds for p in fair),
            )
        )
    result = fit(prefill, decode, prefix)
    residuals = [
        {"point": label, "measured_ms": 1000 * seconds, "law_ms": 1000 * result.step(*row[1:])}
        for label, row, seconds in _rows(prefill, decode, prefix)
    ]
    return {
        "url": url,
        "model": model,
        "prefill": [asdict(p) for p in prefill],
        "decode": [asdict(d) for d in decode],
        "rounds": rounds,
        "fit_seconds": asdict(result),
        "prefix": [asdict(p) for p in prefix],
        "law_vs_measured": residuals,
        "sim": sim_constants(result, step_ms),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running vLLM server")
    parser.add_argument("--model", default="tiny-llama", help="served model name")
    parser.add_argument("--step-ms", type=float, default=20.0, help="scale of the sim constants")
    parser.add_argument(
        "--seed", type=int, default=None, help="prompt ids (default: new ones every run)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="whole grids measured")
    parser.add_argument("--out", help="write the points and the fit as JSON here")
    args = parser.parse_args(argv)
    if not args.url:
        print("calibrate: give --url of a running vLLM server", file=sys.stderr)
        return 2
    # new prompts every run: a server that saw them before would answer from its prefix cache
    seed = args.seed if args.seed is not None else time.time_ns()
    result = asyncio.run(
        calibrate(args.url.rstrip("/"), args.model, seed, args.step_ms, args.rounds)
    )
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")
    print(json.dumps({"fit_seconds": result["fit_seconds"], "sim": result["sim"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
