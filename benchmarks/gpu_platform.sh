#!/usr/bin/env bash
# The GPU platform check of issue 29, one prepared script for a fresh machine with one GPU
# and no network: the product itself on the GPU. Each part runs under its own timeout, so a
# failing or slow part costs only its own figures:
#   data     NYU Depth V2 frames tiled into 480x640 RGB-D shards (benchmarks/gpu_platform.py)
#   matmul   the card's bf16 rate on an 8192^3 matrix product (the ceiling it shows)
#   plain    the same model and batch in a plain PyTorch bf16 loop (gpu_check.py)
#   train    `osmd train` through Ray Train, one GPU worker, bf16, ZeRO 0 and 2, Ray Data
#            streaming the shards (data.in_memory_mb=0)
#   variants the plain loop channels_last and under torch.compile; one DeepSpeed ZeRO-2 rank
#            without Ray (what Ray Train adds, apart from DeepSpeed)
#   seg      segmentation (configs/osmd_nyuv2.yaml) at 480x640 for one short epoch
#   sweep    `osmd sweep`: 4 in-process trials sharing the GPU, 0.25 GPU each
#   tests    the tests marked gpu
# It writes OUT_DIR/platform.json, platform.md and platform.log (the end of every part's log);
# data sets and run folders go to WORK (default /tmp/gpu_platform), not OUT_DIR.
#
# Usage, from the repository root:
#   benchmarks/gpu_platform.sh [OUT_DIR]          # OUT_DIR: $OUT, else benchmarks/results/gpu_platform
# Environment: PARTS="data plain train" (a subset, in this order), BUDGET_S (all parts
# together: 480 s on a GPU), NYU_SRC (the NYUv2 PNG frames; default
# ../shared/data/nyuv2-mini), PYTHON, WORK.
# A CPU smoke run of the whole script (tiny images, small_cnn, fp32):
#   DEVICE=cpu benchmarks/gpu_platform.sh /tmp/gpu_platform_out
#
# On a machine without network, the packages it lacks travel in .whl/ (made here by
# benchmarks/gpu_platform_wheels.sh, installed below into /tmp/site), and the frames with them:
#   benchmarks/gpu_platform_wheels.sh && cp -r ../shared/data/nyuv2-mini .nyu
#   (device) NYU_SRC=.nyu benchmarks/gpu_platform.sh "$OUT"      # carry .whl and .nyu
# Figures and what to pick from them: benchmarks/RESULTS.md, "GPU platform check".
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-${OUT:-benchmarks/results/gpu_platform}}
work=${WORK:-/tmp/gpu_platform}
device=${DEVICE:-cuda}
parts=${PARTS:-data matmul plain train variants seg sweep tests}
nyu_src=${NYU_SRC:-../shared/data/nyuv2-mini}
python=${PYTHON:-python3}
mkdir -p "$out_dir" "$work/status" "$work/logs" "$work/plain" "$work/runs"
: >"$out_dir/platform.log"

if ! "$python" -c "import ray, deepspeed" 2>/dev/null && compgen -G ".whl/*" >/dev/null; then
    echo "gpu_platform: installing the carried packages of .whl/ into /tmp/site"
    mkdir -p /tmp/site
    for tarball in .whl/*.tar.xz; do [ -e "$tarball" ] && tar -xJf "$tarball" -C /tmp/site; done
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package from this tree
export PYTHONUNBUFFERED=1
osmd=("$python" -m osmd_ray.cli)

# BUDGET_S: the seconds all parts together may take (the issue's 8 minutes on a GPU), so
# that a rerun fits the machine's time too; the parts come in the order of PARTS.
if [ "$device" = cuda ]; then
    size=480x640 rows=1024 batch=32 seg_batch=8 encoder=timm:resnet34
    gpu=true gpus_per_trial=0.25 cpus=8 budget=${BUDGET_S:-480}
else
    size=60x80 rows=128 batch=16 seg_batch=8 encoder=small_cnn gpu=false gpus_per_trial=0 cpus=1
    budget=${BUDGET_S:-3600}
fi
# The run config every part measures: configs/osmd_synth.yaml's OS-MD on the tiled frames.
model=("model.image_encoder=$encoder")
if [ "$encoder" != small_cnn ]; then
    model+=(model.hallucination_width=1 model.hallucination_depth=0 model.recon_mode=pooled)
fi
common=("${model[@]}" "data.batch_size=$batch" "data.eval_batch_size=$batch"
    "scaling.use_gpu=$gpu" "scaling.cpus_per_worker=$cpus" tracking.wandb=false)
train_overrides=("data.root=$work/data/cls" data.in_memory_mb=0 "${common[@]}")

{
    date -u +"%Y-%m-%d %H:%M UTC"
    command -v nvidia-smi >/dev/null &&
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    echo "cpus: $(nproc)"
    "$python" - <<'EOF'
import importlib
for name in ("torch", "deepspeed", "ray", "timm", "pyarrow"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as e:
        print(name, "missing:", e)
EOF
} >"$work/machine.txt" 2>&1
cat "$work/machine.txt"

# part NAME SECONDS COMMAND...: run it under its timeout, cut to what is left of BUDGET_S
# (a part that would get under 20 s is skipped), log to WORK/logs/NAME.log, and record rc,
# seconds and whether it timed out in WORK/status/NAME.json.
part() {
    local name=$1 limit=$2
    shift 2
    local started ended rc left=$((budget - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "gpu_platform: $name skipped: the ${budget}s budget is spent" | tee -a "$out_dir/platform.log"
        printf '{"rc": -1, "seconds": 0, "timed_out": true}\n' >"$work/status/$name.json"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    started=$(date +%s%N)
    echo "gpu_platform: $name (at most ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$work/logs/$name.log" 2>&1
    rc=$?
    ended=$(date +%s%N)
    local timed_out=false
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then timed_out=true; fi
    local ms=$(((ended - started) / 1000000))
    printf '{"rc": %d, "seconds": %d.%03d, "timed_out": %s}\n' "$rc" $((ms / 1000)) \
        $((ms % 1000)) "$timed_out" >"$work/status/$name.json"
    { echo "=== $name: rc $rc"; tail -n 40 "$work/logs/$name.log"; } >>"$out_dir/platform.log"
    [ $rc -eq 0 ] || echo "gpu_platform: $name FAILED (rc $rc): $work/logs/$name.log" >&2
}

for step in $parts; do
    case $step in
    data)
        part data 120 "$python" benchmarks/gpu_platform.py data --src "$nyu_src" \
            --out "$work/data" --size "$size" --rows "$rows" \
            $([ "$device" = cpu ] && echo --seg-rows 32 --sweep-rows 64 --eval-rows 16)
        ;;
    matmul)
        part matmul 30 "$python" benchmarks/gpu_platform.py matmul --out "$work/matmul.json"
        ;;
    plain | variants)
        # plain: the reference loop; variants: what might beat it, and DeepSpeed without Ray.
        check=("$python" benchmarks/gpu_check.py --device "$device" --config configs/osmd_synth.yaml)
        if [ "$step" = plain ]; then variants=(torch); else variants=(torch_channels_last torch_compile zero2); fi
        for variant in "${variants[@]}"; do
            case $variant in
            torch) flags=(--mode torch) limit=90 ;;
            torch_channels_last) flags=(--mode torch --channels-last) limit=90 ;;
            torch_compile) flags=(--mode torch --compile --warmup 15) limit=150 ;;
            zero2) flags=(--mode zero2) limit=90 ;;
            esac
            [ "$device" = cpu ] && flags+=(--warmup 2 --windows 2 --steps 2)
            part "plain_$variant" "$limit" "${check[@]}" "${flags[@]}" \
                --out "$work/plain/$variant.json" "${train_overrides[@]}"
        done
        ;;
    train)
        for stage in 0 2; do
            rm -rf "$work/runs/zero$stage"
            part "train_zero$stage" 150 "${osmd[@]}" train --config configs/osmd_synth.yaml \
                --out "$work/runs/zero$stage" "${train_overrides[@]}" train.epochs=2 \
                "train.zero_stage=$stage" scaling.num_workers=1
        done
        ;;
    sweep)
        rm -rf "$work/sweep"
        cat >"$work/sweep.yaml" <<EOF
# Written by benchmarks/gpu_platform.sh: in-process trials packed onto one GPU.
base: $PWD/configs/osmd_synth.yaml
overrides: [data.root=$work/data/sweep, train.epochs=2, $(IFS=,; echo "${common[*]}")]
space:
  train.lr: {loguniform: [3.0e-4, 3.0e-3]}
  loss.w_recon: {loguniform: [1, 30]}
metric: val.deploy.accuracy
mode: max
num_samples: 4
max_concurrent_trials: 4
scheduler: none
search: {algorithm: random, seed: 0}
resources: {num_workers: 0, cpus_per_worker: $cpus, gpus_per_worker: $gpus_per_trial}
EOF
        part sweep 120 "${osmd[@]}" sweep --config "$work/sweep.yaml" --out "$work/sweep"
        ;;
    seg)
        rm -rf "$work/runs/seg"
        seg=("data.root=$work/data/seg" data.in_memory_mb=0 "data.batch_size=$seg_batch"
            "data.eval_batch_size=$seg_batch" train.epochs=1 train.precision=auto
            train.max_failures=0 scaling.num_workers=1 "scaling.use_gpu=$gpu"
            "scaling.cpus_per_worker=$cpus" tracking.wandb=false)
        [ "$device" = cpu ] && seg+=(model.image_encoder=small_cnn model.width=8)
        part seg 120 "${osmd[@]}" train --config configs/osmd_nyuv2.yaml \
            --out "$work/runs/seg" "${seg[@]}"
        ;;
    tests)
        part tests 150 "$python" -m pytest -q -p no:cacheprovider -m gpu tests/gpu
        tail -n 1 "$work/logs/tests.log" >"$work/gpu_tests.txt"
        ;;
    *)
        echo "gpu_platform: unknown part '$step' in PARTS (data matmul plain train variants seg sweep tests)" >&2
        exit 2
        ;;
    esac
done

"$python" benchmarks/gpu_platform.py summarize --work "$work" --out "$out_dir"
