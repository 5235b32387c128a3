#!/usr/bin/env bash
# Issue 7 on one H100 in about 5 minutes: is the project's step (DALI data, DeepSpeed engine,
# Trainer.train_step) at least as fast as hand-written PyTorch? Every figure is printed with its ratio to
# a plain-PyTorch reference step timed in the same process. The summary table and the targets come last;
# logs and the JSON lines stay under $OUT.
#
#   source /tmp/gpu-parts/gpu-env.sh     # DALI + DeepSpeed for the machine's python3 (the caller does this)
#   bash benchmarks/gpu_check.sh         # from the repository root
#   bash benchmarks/gpu_check.sh --cpu   # dry run of every phase on the CPU at toy sizes (a few minutes)
#
# Environment: OUT (default runs/gpu_check), JPEGS (default /tmp/bench-jpegs), BUDGET_S (default 300: no
# phase starts after it and each is cut to what is left), PYTHON (default python3), RN152_COMPILE=1 (also
# compile ResNet-152: ~3 more minutes; its compiled step was slower than eager in ../shared/README.md).
#
# Phases, most important first, each under its own time limit so a failed or slow one costs only itself:
#   make_jpegs  8,000 ImageNet-shaped JPEGs in $JPEGS (~15 s; an epoch of 31 batches of 256, so the rows
#               also report the cost of each epoch start and the rate with ImageNet-sized epochs)
#   resnet50    batch 256: plain-PyTorch reference eager and compiled; the DeepSpeed step on synthetic data
#               and on DALI over the JPEGs, compiled via engine.compile() and in place before
#               deepspeed.initialize, and eager; host syncs counted in the step (~2.5 min, mostly compiling)
#   rn152_rn18  ResNet-152 (batch 128) and ResNet-18 (batch 256), eager: reference and DeepSpeed (~1 min)
#   pipeline    the DALI pipeline alone at ResNet-50's batch, with the paper's scale augmentation (what the
#               training rows use; configs/imagenet) and with random-resized crops (configs/imagenet/modern)
#   cifar       only if .gpudata/cifar10-jpeg.tar.gz is there and time is left: CIFAR ResNet-56 in device
#               memory through DeepSpeed, compile mode reduce-overhead (CUDA graphs) then default
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
CIFAR=.gpudata/cifar10-jpeg.tar.gz
# Sizes: the H100's, or toy ones for a CPU dry run (the same commands, the same code paths).
R50=resnet50:256 R152=resnet152:128 R18=resnet18:256 STEPS=40 WARM=10 NJPEG=8000 CIFAR_STEPS=300
EXTRA=() JPEG_EXTRA=() CIFAR_EXTRA=() DEVICE=cuda SCALE=1
if [ "${1:-}" = --cpu ]; then
    OUT=${OUT:-runs/gpu_check_cpu} BUDGET_S=${BUDGET_S:-2400} DEVICE=cpu SCALE=5
    R50=resnet50:2 R152=resnet152:2 R18=resnet18:2 STEPS=2 WARM=1 NJPEG=24 CIFAR_STEPS=2
    EXTRA=(--device cpu --image-size 64 --compile-backend aot_eager --compile-warmup 1 --threads 2)
    JPEG_EXTRA=(--min-side 64 --max-side 128 --target-kib 4 --workers 2)
    CIFAR_EXTRA=(--set model.compile_backend=aot_eager)
    JPEGS=${JPEGS:-/tmp/bench-jpegs-cpu}
    [ -f "$CIFAR" ] || CIFAR=../shared/datasets/cifar10-jpeg.tar.gz
fi
OUT=${OUT:-runs/gpu_check}
JPEGS=${JPEGS:-/tmp/bench-jpegs}
BUDGET_S=${BUDGET_S:-300}
mkdir -p "$OUT"
RES="$OUT/throughput.jsonl"
: > "$RES"
T0=$SECONDS

phase() {  # phase NAME LIMIT_S CMD...: CMD with its output in $OUT/NAME.log, cut at LIMIT_S or the budget
    local name=$1 limit=$2 left rc t
    shift 2
    limit=$((limit * SCALE))
    left=$((BUDGET_S - (SECONDS - T0)))
    if ((left < 20)); then
        echo "-- $name: skipped, the ${BUDGET_S} s budget is spent"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "-- $name (at most ${limit} s)"
    t=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "   $name: exit $rc after $((SECONDS - t)) s ($OUT/$name.log)"
    return 0
}

echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC') on $(hostname), results in $RES"
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
if ! DEVICE=$DEVICE "$PY" - >"$OUT/versions.txt" 2>&1 <<'EOF'
import os, sys, torch, deepspeed, nvidia.dali
assert os.environ["DEVICE"] == "cpu" or torch.cuda.is_available(), "no CUDA device visible"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"DeepSpeed {deepspeed.__version__}, DALI {nvidia.dali.__version__}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")
EOF
then
    echo "error: torch with CUDA, deepspeed and nvidia.dali must import (source /tmp/gpu-parts/gpu-env.sh first):"
    tail -5 "$OUT/versions.txt"
    exit 2
fi
tail -1 "$OUT/versions.txt"

BENCH=("$PY" benchmarks/throughput.py --out "$RES" --threads 12 --prefetch 3 "${EXTRA[@]}")
phase make_jpegs 90 "$PY" benchmarks/make_jpegs.py "$JPEGS" --count "$NJPEG" "${JPEG_EXTRA[@]}"
phase resnet50 200 "${BENCH[@]}" --model "$R50" --data "synthetic,folder:$JPEGS" \
    --compile engine,module,off --reference eager,compiled --warmup "$WARM" --steps "$STEPS" --sync-check
if [ "${RN152_COMPILE:-0}" = 1 ]; then
    phase resnet152_compiled 300 "${BENCH[@]}" --model "$R152" --data "folder:$JPEGS" \
        --compile engine --reference compiled --warmup "$WARM" --steps "$STEPS"
fi
phase rn152_rn18 100 "${BENCH[@]}" --model "$R152,$R18" \
    --data "synthetic,folder:$JPEGS" --compile off --reference eager --warmup "$WARM" --steps "$STEPS"
phase pipeline 60 "${BENCH[@]}" --model "$R50" --data "folder:$JPEGS" --augment paper,rrc --pipeline-only \
    --warmup 5 --steps $((STEPS + 20))
if [ -f "$CIFAR" ]; then
    for mode in reduce-overhead default; do
        phase "cifar_$mode" 90 "${BENCH[@]}" --config configs/cifar10/cifar_resnet56.toml \
            --set "data.root=$CIFAR" --set "model.compile_mode=$mode" --set progress=false "${CIFAR_EXTRA[@]}" \
            --reference compiled --warmup "$WARM" --compile-warmup "$WARM" --steps "$CIFAR_STEPS" --sync-check
    done
else
    echo "-- cifar: skipped ($CIFAR is not there)"
fi

echo
echo "gpu_check finished in $((SECONDS - T0)) s; results $RES"
"$PY" benchmarks/throughput.py --table "$RES" --targets | tee "$OUT/table.txt"
