#!/usr/bin/env bash
# The GPU check of issue 9, as one prepared script for a machine with one GPU (an H200 here):
# bf16 OS-MD training at the NYUv2 image configuration (480x640 RGB-D, timm ResNet-34
# encoders), plain PyTorch against DeepSpeed ZeRO-2 and ZeRO-3: samples/s, the ratio, achieved
# TFLOP/s and peak memory. Results: benchmarks/RESULTS.md ("GPU check").
#
# Usage, from the repository root:
#   benchmarks/gpu_check.sh [OUT_DIR] [extra gpu_check.py flags, e.g. --batch 64]
# OUT_DIR defaults to benchmarks/results/gpu. Needs torch with CUDA, timm and deepspeed; Ray
# is not used (see gpu_check.py's docstring). On a machine without internet, put wheels of the
# missing packages in .whl/ (deepspeed, hjson, pydantic, pydantic-core, annotated-types,
# typing-inspection): they are installed into /tmp/gpu_check_site first.
# MODES="zero2 zero3" measures a subset (default: torch zero2 zero3).
# CPU smoke run of the same script: benchmarks/gpu_check.sh /tmp/gpu --device cpu --quick
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-benchmarks/results/gpu}
shift || true
python=${PYTHON:-python3}
mkdir -p "$out_dir"

if ! "$python" -c "import deepspeed" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_check: installing the wheels in .whl/ into /tmp/gpu_check_site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
        | tee "$out_dir/gpu.csv"
fi
"$python" - <<'EOF' | tee "$out_dir/versions.txt"
import importlib
for name in ("torch", "deepspeed", "timm"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as e:
        print(name, "missing:", e)
EOF

status=0
for mode in ${MODES:-torch zero2 zero3}; do
    # One process per mode: peak memory is that mode's alone, and a crash in one is reported
    # without losing the others.
    if ! timeout 240 "$python" benchmarks/gpu_check.py --mode "$mode" \
            --out "$out_dir/$mode.json" "$@" >"$out_dir/$mode.log" 2>&1; then
        echo "gpu_check: mode $mode FAILED; the end of $out_dir/$mode.log:" >&2
        tail -n 25 "$out_dir/$mode.log" >&2
        status=1
    fi
done
if compgen -G "$out_dir/*.json" >/dev/null; then
    "$python" benchmarks/gpu_check.py --summarize "$out_dir"/*.json | tee "$out_dir/summary.md"
fi
exit $status
