#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what a GPU machine that has no network needs on top of its
# own packages (Python 3.12, x86-64, CUDA torch, numpy, pyarrow, pandas, ... but no ray,
# deepspeed, pydantic, jsonschema, optuna) to run this repo's benchmarks and tests/gpu.
#
# Run HERE (a machine that reaches PyPI), from the repo root:
#     bash benchmarks/gpu_platform_wheels.sh
# It rebuilds .whl/ from scratch every time (idempotent), prints every file's size and the
# total, and fails when .whl/ is over 45 MiB (the repo copy sent to the GPU machine must stay
# under 64 MiB in all).
#
# .whl/ then holds:
#   ray-2.60.0-stripped.tar.xz  the cp312 manylinux ray 2.60.0 wheel unpacked (ray/ and
#       ray-2.60.0.dist-info/), without ray/jars (Java workers), ray/rllib (RL library) and the
#       dashboard's web UI bundle (ray/dashboard/client/build/{static,speedscope-*}: only the
#       full dashboard serves it, and that needs aiohttp_cors and opencensus, which the GPU
#       machine lacks; index.html and an empty static/ stay so that it would still start).
#       Ray's 79 MB wheel packs to about 28 MiB that way.
#   *.whl  cp312 / py3-none-any wheels of the rest: deepspeed (built here from its sdist,
#       pure Python, no ops prebuilt: they JIT-build on first use), hjson, pydantic +
#       pydantic-core, annotated-types, typing-inspection, typing-extensions (pydantic needs
#       >= 4.16, newer than the GPU machine may have), jsonschema + jsonschema-specifications
#       + referencing + rpds-py (ray's own requirements), optuna + alembic + sqlalchemy + mako
#       + colorlog (the sweeps' default search: search: {algorithm: optuna}), tensorboardX
#       (ray[tune]'s requirement: without it Tune warns and skips its TensorBoard logger).
#
# On the GPU machine, from the repo copy's root (what the GPU scripts run):
#     mkdir -p /tmp/site && tar -xJf .whl/ray-2.60.0-stripped.tar.xz -C /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# or the same as a function: `source benchmarks/gpu_platform_wheels.sh` defines
# install_gpu_platform_wheels [SITE] (default /tmp/site) and builds nothing.
#
# Environment: PYTHON (default python3) runs `pip download`; BUILD_PYTHON (default
# .venv/bin/python, which has setuptools and torch) builds the deepspeed wheel.
# The pinned versions below are those of .venv; a mismatch is reported, not fatal.

install_gpu_platform_wheels() {
    # Unpacks ray and installs the wheels into SITE, then puts SITE and the repo (the working
    # directory) on PYTHONPATH. Run from the repo root; returns non-zero at the first failure.
    local site="${1:-/tmp/site}"
    mkdir -p "$site" &&
        tar -xJf .whl/ray-2.60.0-stripped.tar.xz -C "$site" &&
        "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$site" .whl/*.whl &&
        export PYTHONPATH="$site:$PWD"
}

# Sourced: only the function above.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    return 0
fi

set -euo pipefail

RAY_VERSION=2.60.0
DEEPSPEED_VERSION=0.19.8
PINS=(
    hjson==3.1.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    jsonschema==4.26.0
    jsonschema-specifications==2025.9.1
    referencing==0.37.0
    rpds-py==2026.9.1
    optuna==5.1.0
    alembic==1.20.1
    sqlalchemy==2.1.9
    mako==1.4.3
    colorlog==6.12.0
    tensorboardx==2.6.5
)
LIMIT_MIB=45

PYTHON="${PYTHON:-python3}"
BUILD_PYTHON="${BUILD_PYTHON:-.venv/bin/python}"

if [[ ! -f pyproject.toml || ! -d osmd_ray ]]; then
    echo "run from the repo root (bash benchmarks/gpu_platform_wheels.sh)" >&2
    exit 2
fi
for tool in unzip tar xz; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done

# Versions in .venv, where there is one: say which pins differ (the pins still win).
if [[ -x "$BUILD_PYTHON" ]]; then
    "$BUILD_PYTHON" - "ray==$RAY_VERSION" "deepspeed==$DEEPSPEED_VERSION" "${PINS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != wanted:
        print(f"note: {name} pinned at {wanted}, .venv has {have}")
EOF
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_platform_wheels.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
OUT="$WORK/out"
mkdir -p "$OUT" "$WORK/dl"

PLATFORM_ARGS=(
    --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux1_x86_64
)

echo "== downloading ${#PINS[@]} wheels"
"$PYTHON" -m pip download -q "${PLATFORM_ARGS[@]}" -d "$OUT" "${PINS[@]}"

echo "== building deepspeed $DEEPSPEED_VERSION (DS_BUILD_OPS=0, pure Python)"
DS_BUILD_OPS=0 "$BUILD_PYTHON" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation \
    -w "$WORK/ds" "deepspeed==$DEEPSPEED_VERSION"
DS_WHEEL=("$WORK"/ds/deepspeed-"$DEEPSPEED_VERSION"-py3-none-any.whl)
[[ -f "${DS_WHEEL[0]}" ]] || { echo "no py3-none-any deepspeed wheel built" >&2; exit 1; }
cp "${DS_WHEEL[0]}" "$OUT/"

echo "== ray $RAY_VERSION: download, strip, xz -6"
"$PYTHON" -m pip download -q "${PLATFORM_ARGS[@]}" -d "$WORK/dl" "ray==$RAY_VERSION"
RAY_WHEEL=("$WORK"/dl/ray-"$RAY_VERSION"-cp312-cp312-*.whl)
[[ -f "${RAY_WHEEL[0]}" ]] || { echo "no cp312 ray wheel downloaded" >&2; exit 1; }
mkdir "$WORK/ray"
# unzip keeps the executable bits of raylet, gcs_server and the like (Python's zipfile doesn't).
unzip -q "${RAY_WHEEL[0]}" -d "$WORK/ray"
(
    cd "$WORK/ray"
    rm -rf ray/jars ray/rllib
    rm -rf ray/dashboard/client/build/static ray/dashboard/client/build/speedscope-*
    mkdir -p ray/dashboard/client/build/static
    [[ -f ray/_raylet.so ]] || { echo "ray/_raylet.so missing" >&2; exit 1; }
    tar --sort=name --owner=0 --group=0 --numeric-owner -cf - ray "ray-$RAY_VERSION.dist-info" |
        xz -6 -T0 >"$OUT/ray-$RAY_VERSION-stripped.tar.xz"
)

# Exactly one file per distribution.
"$PYTHON" - "$OUT" <<'EOF'
import collections, os, re, sys

names = collections.Counter(
    re.sub(r"[-_.]+", "-", f.split("-")[0]).lower() for f in os.listdir(sys.argv[1])
)
twice = [n for n, c in names.items() if c > 1]
if twice:
    sys.exit(f"more than one file for: {', '.join(twice)}")
EOF

# Replace .whl/ only now that everything is built.
rm -rf .whl
mkdir .whl
cp "$OUT"/* .whl/

echo "== .whl/"
(cd .whl && ls -l | awk 'NR > 1 {printf "%9.2f MiB  %s\n", $5 / 1048576, $9}')
TOTAL_BYTES="$(du -cb .whl/* | tail -1 | cut -f1)"
awk -v b="$TOTAL_BYTES" -v l="$LIMIT_MIB" 'BEGIN {printf "total %.2f MiB (limit %d MiB)\n", b / 1048576, l}'
if ((TOTAL_BYTES > LIMIT_MIB * 1048576)); then
    echo "FAIL: .whl/ is over $LIMIT_MIB MiB" >&2
    exit 1
fi
