#!/usr/bin/env bash
# Install what the benchmark needs: nginx and HAProxy from Debian, and a venv of its own
# (bench/.env, gitignored) with vllm-fleet (editable), matplotlib and the two Rust routers from
# PyPI. Kept apart from the project's .venv so the routers' pinned dependencies never touch it.
# Re-running is cheap: a stamp keyed on this file skips work already done.
# Every step may fail on its own: a peer whose program is missing is reported as "not started"
# in the tables, never silently dropped.
set -uo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
stamp=".env/.bench-installed-$(sha256sum setup.sh | cut -c1-16)"
if [ -f "$stamp" ]; then
    exit 0
fi

if ! command -v nginx >/dev/null 2>&1 || ! command -v haproxy >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bench: installing nginx and haproxy from Debian..."
        # RUNLEVEL=1 keeps the packages' init scripts from starting system-wide services.
        apt-get update -qq >/dev/null 2>&1 || true
        RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light haproxy \
            >/dev/null 2>&1 \
            || RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy \
                >/dev/null 2>&1 \
            || echo "bench: could not install nginx/haproxy; those peers will be reported missing"
    else
        echo "bench: nginx/haproxy missing and not root: those peers will be reported missing"
    fi
fi

if [ ! -x .env/bin/python ]; then
    "$python" -m venv .env 2>/dev/null || {
        rm -rf .env
        "$python" -m pip install --quiet --user virtualenv 2>/dev/null || true
        "$python" -m virtualenv --quiet .env
    }
fi
pip=(.env/bin/python -m pip install --quiet --disable-pip-version-check)
# vllm-fleet itself (editable, so the benchmark measures the working tree), plus matplotlib
# and httptools (bench.floor_proxies).
"${pip[@]}" -e .. "matplotlib>=3.8" "httptools>=0.6" 2>&1 | grep -v "^WARNING: Location" \
    || true
.env/bin/python -c "import matplotlib, aiohttp, httptools, vllm_fleet.launcher, vllm_fleet.router" \
    || { echo "bench: installing vllm-fleet/matplotlib into bench/.env failed"; exit 1; }
# The Rust routers each ship a binary in their wheel; either may be unavailable for a platform.
for package in vllm-router sglang-router; do
    "${pip[@]}" "$package" 2>&1 | grep -v "^WARNING: Location" || true
    .env/bin/python -m pip show --quiet "$package" >/dev/null 2>&1 \
        || echo "bench: $package failed to install; its peers are reported missing"
done
rm -f .env/.bench-installed-*
touch "$stamp"
