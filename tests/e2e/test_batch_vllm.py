"""`vllm-fleet batch` through the router to two real vLLM CPU replicas: a 50-request file,
chat and completions lines mixed, every line answered once with vLLM's own response body.

The batch runs as users run it (the CLI in its own process) with ``--max-inflight auto``, so
the router's ``/fleet/replicas`` start and the queue rule meet real engines; the requests carry
vLLM's ``priority`` field, which vLLM 0.32 accepts on an engine without priority scheduling.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.support import MODEL, Server
from tests.launcher.batch.support import answered_once, read_results
from tests.support.batch import run_batch_command

pytestmark = pytest.mark.e2e

REQUESTS = 50
MAX_TOKENS = 8
REPO = Path(__file__).resolve().parents[2]


def write_mixed_batch(path: Path) -> list[str]:
    ids = []
    with path.open("w") as handle:
        for n in range(REQUESTS):
            custom_id = f"e2e-{n}"
            ids.append(custom_id)
            if n % 2:
                url = "/v1/completions"
                body: dict[str, object] = {"model": MODEL, "prompt": f"Item {n}:"}
            else:
                url = "/v1/chat/completions"
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"Item {n}"}]}
            body |= {"max_tokens": MAX_TOKENS, "ignore_eos": True}
            line = {"custom_id": custom_id, "method": "POST", "url": url, "body": body}
            handle.write(json.dumps(line) + "\n")
    return ids


def test_fifty_requests_through_the_router_each_answered_once(
    router: Server, tmp_path: Path
) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = write_mixed_batch(source)
    done = run_batch_command(source, output, router.url)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["succeeded"] == REQUESTS
    assert summary["completion_tokens"] == REQUESTS * MAX_TOKENS  # ignore_eos: exact
    records = read_results(output)
    assert answered_once(records, ids) == {"200": REQUESTS}
    objects = {r["response"]["body"]["object"] for r in records}
    assert objects == {"chat.completion", "text_completion"}
    rerun = run_batch_command(source, output, router.url, timeout_s=120)
    assert (
        rerun.returncode == 0
        and json.loads(rerun.stdout.strip().splitlines()[-1])["skipped"] == REQUESTS
    )
    assert len(read_results(output)) == REQUESTS
