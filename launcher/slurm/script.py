"""The sbatch script of a fleet job, as text (pure: a ``JobSpec`` in, a string out).

The script is meant to be read: each block says what it does and why. Everything that is a
decision lives elsewhere: the layout and every command line come from the planner
(``vllm_fleet.launcher.slurm.layout``, whose engine commands ``vllm_fleet.launcher.vllm_args``
builds), the router's command from ``vllm_fleet.launcher.fleet.router_spec``, the site's settings
from fleet.yaml's ``slurm:`` section. The script only places them on nodes, in this order, and stops
them in reverse:

* shape 1 (replicas): `vllm-fleet up` on every node (one srun task per node), one router on the
  first node over every node's replicas (the backends file is written from `scontrol show
  hostnames`);
* shape 2 (ray): a Ray head on the first node, then workers on the others (`srun --overlap`),
  readiness by polling `ray status` until every node is in (never a fixed sleep), then the
  planner's vLLM command on the head, behind the router.

Ports come from a per-job range (``PORT_BASE`` from the job id) so users sharing a node do not
clash. Stopping (the time limit's SIGTERM, `vllm-fleet down --job`) goes router, engine, Ray.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_fleet.launcher.slurm.layout import NodesPlan
from vllm_fleet.launcher.slurm.settings import SlurmSettings

#: first port of the per-job ranges; job j uses PORT_BASE = FIRST_PORT + (j % PORT_SLOTS) *
#: PORT_RANGE. Every range stays below 32768, where Linux's ephemeral ports begin
#: (net.ipv4.ip_local_port_range 32768-60999): a port there may be the local end of any
#: outgoing connection on the node, and a job whose range reached it failed to bind
#: ("address already in use") whenever one was (job 70 of the CI cluster: 48000-48399).
#: A job's range is 400 ports (the offsets below, then Ray's worker ports to its end): 31
#: ranges fit.
FIRST_PORT = 20000
PORT_RANGE = 400
PORT_SLOTS = (32768 - FIRST_PORT) // PORT_RANGE
#: offsets inside a job's range (documented in docs/slurm.md).
ROUTER_OFFSET = 0
NODE_ROUTER_OFFSET = 1
REPLICA_OFFSET = 2
ENGINE_OFFSET = 50
RAY_OFFSET = 60
#: how long each part may take to stop after SIGTERM before it is killed; all of them (the two
#: Ray steps stop one after the other) fit in SIGNAL_LEAD_S, so the time limit never cuts it.
STOP_GRACE_S = {"router": 10, "engine": 50, "ray": 25}
#: seconds before the time limit at which SLURM sends SIGTERM to the batch shell.
SIGNAL_LEAD_S = 120

#: tokens in command lines that the script replaces with its shell variables.
PY = "@PY@"
BACKENDS = "@BACKENDS@"


@dataclass(frozen=True)
class JobSpec:
    """Everything the script needs, already decided."""

    layout: NodesPlan
    settings: SlurmSettings
    #: absolute directory for the job's log, endpoint file and run directories.
    log_dir: str
    #: Python with vllm-fleet on the nodes (``python3`` in a container).
    python: str
    #: the router's argv (vllm_fleet.launcher.fleet.router_spec), with PY and BACKENDS tokens.
    router_command: tuple[str, ...]
    #: shape 1: the fleet file every node's `vllm-fleet up` reads (YAML text).
    node_config: str
    #: what clients send as the model name.
    model: str
    #: the router needs FLEET_API_KEYS from the submitting shell.
    api_keys: bool = False
    #: `vllm-fleet batch` input and output (both or neither): the job runs it and ends.
    batch_input: str | None = None
    batch_output: str | None = None


def sbatch_lines(spec: JobSpec) -> list[str]:
    """The #SBATCH header: every flag given, nothing assumed about the site."""
    s, layout = spec.settings, spec.layout
    lines = [
        f"#SBATCH --job-name={s.job_name}",
        f"#SBATCH --nodes={layout.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if layout.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={layout.gpus_per_node}")
    for flag, value in (
        ("partition", s.partition),
        ("time", s.time),
        ("account", s.account),
        ("qos", s.qos),
        ("constraint", s.constraint),
    ):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    if s.exclusive:
        lines.append("#SBATCH --exclusive")
    lines += [f"#SBATCH {extra}" for extra in s.extra_sbatch]
    lines += [
        f"#SBATCH --output={spec.log_dir}/%j.log",
        f"#SBATCH --signal=B:TERM@{SIGNAL_LEAD_S}",
    ]
    return lines


def shell_words(argv: Sequence[str], port_var: str | None = None) -> list[str]:
    """``argv`` quoted for the script; PY and BACKENDS become variables, as does the value of
    ``--port`` when ``port_var`` is given (the port is the job's, known only when it runs)."""
    words: list[str] = []
    follows_port = False
    for arg in argv:
        if follows_port and port_var:
            words.append(f'"${port_var}"')
        elif arg == PY:
            words.append('"$PY"')
        elif arg == BACKENDS:
            words.append('"$JOB_DIR/backends.yaml"')
        else:
            words.append(shlex.quote(arg))
        follows_port = arg == "--port"
    return words


def _wrapped(words: list[str], indent: str = "    ") -> str:
    """Long command lines broken before each flag, so a reader sees one option a line."""
    out: list[str] = []
    for word in words:
        if out and word.startswith("--") and len(out[-1]) > 2:
            out.append(word)
        elif out:
            out[-1] += " " + word
        else:
            out.append(word)
    return (" \\\n" + indent).join(out)


def _container_words(spec: JobSpec) -> tuple[list[str], list[str]]:
    """(srun options, command prefix) that put a step in the container, if there is one."""
    image = spec.settings.container
    if image is None:
        return [], []
    if spec.settings.container_runtime == "pyxis":
        return [
            f"--container-image={shlex.quote(image)}",
            '--container-mounts="$LOG_DIR"',
            "--no-container-remap-root",
        ], []
    nv = ["--nv"] if spec.layout.gpus_per_node else []
    return [], ["apptainer", "exec", *nv, "--bind", '"$LOG_DIR"', shlex.quote(image)]


def _header(spec: JobSpec) -> list[str]:
    layout = spec.layout
    return [
        "#!/bin/bash",
        f"# vllm-fleet job: {spec.model} on {layout.nodes} node(s). Written by `vllm-fleet slurm`",
        "# from the same planner as `vllm-fleet plan` and `up`; submit with `sbatch FILE`.",
        f"# {layout.describe()}",
        *sbatch_lines(spec),
        "",
        "set -euo pipefail",
        "",
    ]


def _site(spec: JobSpec) -> list[str]:
    s = spec.settings
    lines = ["# --- site setup (slurm.setup / --setup), then the job's environment (slurm.env)"]
    lines += list(s.setup) or ["# (none)"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in s.env.items()]
    if spec.api_keys:
        lines.append(
            ': "${FLEET_API_KEYS:?export FLEET_API_KEYS (the router\'s keys) before sbatch}"'
        )
    return [*lines, ""]


def _variables(spec: JobSpec) -> list[str]:
    srun_opts, prefix = _container_words(spec)
    step_srun = " ".join(["srun --overlap", '--job-name="$name"', *srun_opts, '"${opts[@]}"'])
    if srun_opts:
        # pyxis: the agent runs in the container too, as a step on the first node.
        agent_prefix = " ".join(["srun --overlap --nodes=1 --ntasks=1", *srun_opts]) + " "
    else:
        agent_prefix = " ".join(prefix) + " " if prefix else ""
    run = " ".join([*prefix, '"$@"'])
    return [
        "# --- where things are",
        f"PY={shlex.quote(spec.python)}",
        f"LOG_DIR={shlex.quote(spec.log_dir)}",
        'JOB_DIR="$LOG_DIR/$SLURM_JOB_ID"          # run directories and the backends file',
        'ENDPOINT="$LOG_DIR/$SLURM_JOB_ID.json"    # URL and state, for `vllm-fleet status --job`',
        f"PORT_BASE=$(( {FIRST_PORT} + (SLURM_JOB_ID % {PORT_SLOTS}) * {PORT_RANGE} ))"
        "  # this job's ports",
        f"ROUTER_PORT=$(( PORT_BASE + {ROUTER_OFFSET} ))",
        *_shape_ports(spec),
        'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        "HEAD_NODE=${NODES[0]}",
        'mkdir -p "$JOB_DIR"',
        "",
        "# step NAME SRUN_OPTION... -- COMMAND... &: a named job step (so it can be stopped by",
        "# name), in the container if one is set. Always in the background: srun replaces the",
        "# subshell, so $! is srun's own pid.",
        "step() {",
        "    local name=$1",
        "    local opts=()",
        "    shift",
        '    while [ "$1" != -- ]; do',
        '        opts+=("$1")',
        "        shift",
        "    done",
        "    shift",
        f"    exec {step_srun} {run}",
        "}",
        f'agent() {{ {agent_prefix}"$PY" -m vllm_fleet.launcher.slurm.agent "$@"; }}',
        "# A long wait in the background, so SIGTERM (the trap) is handled at once.",
        'interruptible() { "$@" & wait "$!"; }',
        "",
    ]


def _shape_ports(spec: JobSpec) -> list[str]:
    if spec.layout.shape == "replicas":
        return [
            f"NODE_ROUTER_PORT=$(( PORT_BASE + {NODE_ROUTER_OFFSET} ))"
            "  # each node's own `up` router (loopback)",
            f"REPLICA_PORT=$(( PORT_BASE + {REPLICA_OFFSET} ))"
            "  # a node's replica i: REPLICA_PORT + i",
        ]
    return [
        f"ENGINE_PORT=$(( PORT_BASE + {ENGINE_OFFSET} ))  # the vLLM server",
        f"RAY_PORT=$(( PORT_BASE + {RAY_OFFSET} ))  # Ray's GCS; each node's Ray ports follow",
    ]


_CLEANUP = r"""# --- clean ends: router, then the engine, then Ray; on the time limit's SIGTERM
# (#SBATCH --signal), `vllm-fleet down --job`, or any failure above.
# A step is asked to stop with SIGTERM through scancel (srun itself would kill it at once),
# and waited for; what is still running after its grace period is killed.
stop_step() {
    local pid=$1 name=$2 grace=$3 step
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        return 0
    fi
    echo "vllm-fleet: stopping $name"
    step=$(squeue --steps --noheader --jobs="$SLURM_JOB_ID" --format='%i %j' \
        | awk -v name="$name" '$2 == name { print $1 }')
    if [ -n "$step" ]; then
        scancel --signal=TERM "$step" 2>/dev/null || true
    else
        kill -TERM "$pid" 2>/dev/null || true
    fi
    local deadline=$((SECONDS + grace))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
ROUTER_PID="" ENGINE_PID="" RAY_WORKERS_PID="" RAY_HEAD_PID="" FINAL_STATE=failed
cleanup() {
    trap - EXIT TERM INT
    stop_step "$ROUTER_PID" fleet-router @router@
    stop_step "$ENGINE_PID" fleet-engine @engine@
    stop_step "$RAY_WORKERS_PID" fleet-ray-workers @ray@
    stop_step "$RAY_HEAD_PID" fleet-ray-head @ray@
    agent endpoint --file "$ENDPOINT" --state "$FINAL_STATE" || true
    echo "vllm-fleet: job $SLURM_JOB_ID ended ($FINAL_STATE)"
}
trap cleanup EXIT
trap 'FINAL_STATE=stopped; exit 0' TERM INT
"""


def _cleanup() -> list[str]:
    text = _CLEANUP
    for key, seconds in STOP_GRACE_S.items():
        text = text.replace(f"@{key}@", str(seconds))
    return [*text.splitlines(), ""]


def _endpoint_start(spec: JobSpec) -> list[str]:
    return [
        "# --- the endpoint file: STARTING now, READY once the router serves every replica",
        'URL="http://$(hostname -f 2>/dev/null || hostname):$ROUTER_PORT/v1"',
        _wrapped(
            [
                'agent endpoint --file "$ENDPOINT" --state starting',
                '--job "$SLURM_JOB_ID"',
                '--url "$URL"',
                '--router "http://127.0.0.1:$ROUTER_PORT"',
                f"--model {shlex.quote(spec.model)}",
                f"--shape {spec.layout.shape}",
                '--log "$LOG_DIR/$SLURM_JOB_ID.log"',
                '--nodes "${NODES[@]}"',
            ]
        ),
        "",
    ]


AGENT = '"$PY" -m vllm_fleet.launcher.slurm.agent'


def _shape_replicas(spec: JobSpec) -> list[str]:
    per = spec.layout.replicas_per_node
    up = [
        'step fleet-engine --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --',
        f"{AGENT} node-up",
        '--run-dir "$JOB_DIR"',
        "--",
        "up",
        '--config "$JOB_DIR/fleet.yaml"',
        "--host 0.0.0.0",
        '--base-port "$REPLICA_PORT"',
        '--port "$NODE_ROUTER_PORT"',
    ]
    return [
        f"# --- shape 1: every node runs `vllm-fleet up` for its own GPUs ({per} replica(s) each,",
        "# pinned with CUDA_VISIBLE_DEVICES as `up` does), listening on the node's address.",
        "cat >\"$JOB_DIR/fleet.yaml\" <<'FLEET_YAML'",
        spec.node_config.rstrip("\n"),
        "FLEET_YAML",
        _wrapped(up) + " &",
        "ENGINE_PID=$!",
        "",
        "# One router on the first node fronts every node's replicas (hosts from scontrol).",
        _wrapped(
            [
                'agent backends --out "$JOB_DIR/backends.yaml"',
                f'--ports "$REPLICA_PORT" {per}',
                '--hosts "${NODES[@]}"',
            ]
        ),
    ]


def _ray_node(head: bool) -> list[str]:
    return [
        f"{AGENT} ray-node",
        "--head" if head else '--address "$HEAD_IP:$RAY_PORT"',
        '--port-base "$RAY_PORT"',
        '--temp-dir "/tmp/ray-$SLURM_JOB_ID"',
    ]


def _ray_wait(spec: JobSpec, nodes: int) -> str:
    return _wrapped(
        [
            'interruptible agent ray-wait --address "$HEAD_IP:$RAY_PORT"',
            f"--nodes {nodes}",
            f"--timeout {spec.settings.ready_timeout_s:g}",
            '--watch-pid "$RAY_HEAD_PID"',
        ]
    )


def _shape_ray(spec: JobSpec) -> list[str]:
    layout = spec.layout
    workers = layout.nodes - 1
    engine = shell_words(layout.engine.command, port_var="ENGINE_PORT")
    # SLURM gives each node its GPUs; Ray places the workers on them.
    env = [
        f"{k}={shlex.quote(v)}" for k, v in layout.engine.env.items() if k != "CUDA_VISIBLE_DEVICES"
    ]
    head = 'step fleet-ray-head --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --'
    worker = (
        'step fleet-ray-workers --nodes="$WORKERS" --ntasks-per-node=1 --exclude="$HEAD_NODE" --'
    )
    return [
        f"# --- shape 2: one server across {layout.nodes} node(s) with Ray. The head first, on the",
        "# first node, at the head's IP (VLLM_HOST_IP: the agent sets each node's own).",
        "HEAD_IP=$(agent node-ip)",
        _wrapped([head, *_ray_node(head=True)]) + " &",
        "RAY_HEAD_PID=$!",
        "# Workers only once the head answers (a worker started first cannot join).",
        _ray_wait(spec, 1),
        f"WORKERS={workers}",
        'if [ "$WORKERS" -gt 0 ]; then',
        "    # one worker per other node; the agent gives each its own Ray ports (from",
        "    # SLURM_PROCID), so even two on one host would not clash.",
        "    " + _wrapped([worker, *_ray_node(head=False)], indent="        ") + " &",
        "    RAY_WORKERS_PID=$!",
        "fi",
        "# Ready when `ray status` counts every node: polled, bounded, never a fixed sleep.",
        _ray_wait(spec, layout.nodes),
        "",
        "# The planner's command (`vllm-fleet plan --nodes` shows it), run on the head node.",
        _wrapped(
            [
                'step fleet-engine --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" -- env',
                'VLLM_HOST_IP="$HEAD_IP"',
                'RAY_ADDRESS="$HEAD_IP:$RAY_PORT"',
                *env,
                *engine,
            ]
        )
        + " &",
        "ENGINE_PID=$!",
        'agent backends --out "$JOB_DIR/backends.yaml" --ports "$ENGINE_PORT" 1 --hosts 127.0.0.1',
    ]


def _router_and_wait(spec: JobSpec) -> list[str]:
    layout = spec.layout
    replicas = layout.nodes * layout.replicas_per_node if layout.shape == "replicas" else 1
    router = shell_words(spec.router_command, port_var="ROUTER_PORT")
    lines = [
        "",
        "# --- the router, on the first node, listening on every interface",
        _wrapped(['step fleet-router --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --', *router])
        + " &",
        "ROUTER_PID=$!",
        "# READY: the router serves every replica (written atomically; the URL goes to the log).",
        _wrapped(
            [
                'interruptible agent await-ready --endpoint "$ENDPOINT"',
                f"--replicas {replicas}",
                f"--timeout {spec.settings.ready_timeout_s:g}",
                '--watch-pid "$ROUTER_PID"',
                '--watch-pid "$ENGINE_PID"',
            ]
        ),
        'echo "vllm-fleet: ready at $URL"',
        "",
    ]
    if spec.batch_input and spec.batch_output:
        return [
            *lines,
            "# --- batch: the input through this job's fleet, then the job ends (resubmit to",
            "# resume: `vllm-fleet batch` skips what the output already holds).",
            _wrapped(
                [
                    f'"$PY" -m vllm_fleet.launcher.cli batch {shlex.quote(spec.batch_input)}',
                    f"--output {shlex.quote(spec.batch_output)}",
                    '--endpoint "http://127.0.0.1:$ROUTER_PORT"',
                ]
            ),
            "FINAL_STATE=completed",
        ]
    return [
        *lines,
        "# --- serve until the time limit or `vllm-fleet down --job`; a part that exits ends",
        "# the job (its log says which).",
        'wait -n "$ROUTER_PID" "$ENGINE_PID" || true',
        'echo "vllm-fleet: a part of the fleet exited; stopping the job" >&2',
    ]


def render_script(spec: JobSpec) -> str:
    """The whole sbatch script."""
    body = _shape_replicas(spec) if spec.layout.shape == "replicas" else _shape_ray(spec)
    lines = [
        *_header(spec),
        *_site(spec),
        *_variables(spec),
        *_cleanup(),
        *_endpoint_start(spec),
        *body,
        *_router_and_wait(spec),
    ]
    return "\n".join(lines) + "\n"
