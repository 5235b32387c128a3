#!/usr/bin/env bash
# Issue 8 on one H100: plain-20, plain-56, ResNet-20 and ResNet-56 on the paper's full CIFAR-10 schedule
# (64k iterations each, configs/cifar10/), trained at the same time as separate processes, aiming at
# <= 9 minutes together, then the Table 6 / Figure 6 report. Each member is an ordinary study member
# (pipeline.study -> pipeline.train -> Trainer, DeepSpeed, checkpoints, MLflow); only the launch is
# concurrent (benchmarks/study_parallel.py). The MLflow store (mlflow.db), the report, the logs and the
# probe's figures end up under $OUT.
#
#   source /tmp/gpu-parts/gpu-env.sh        # DALI + DeepSpeed for the machine's python3 (the caller does this)
#   bash benchmarks/cifar_table6_gpu.sh     # from the repository root, with .gpudata/cifar10-jpeg.tar.gz
#   bash benchmarks/cifar_table6_gpu.sh --cpu   # dry run on the CPU: the same steps on a toy schedule
#
# Steps:
#   1. checks (archive, torch + CUDA, DeepSpeed, DALI; MLflow is optional), archive extracted once
#   2. timing probe: the four members warm up together (compilation, which also fills the compile cache
#      for step 3), then each trains alone for PROBE_S seconds and then all four together for PROBE_S;
#      prints the projected wall time of the full run concurrently and one after another, and stops here
#      when the better one exceeds LIMIT_S (a probe that fails with CUDA graphs is retried once with
#      model.compile_mode = default, which the full run then uses too)
#   3. the full run, concurrently or one after another as the probe says; every member still running at
#      LIMIT_S + 90 s is stopped (checkpoint first) so the device time stays bounded
#   4. the report (python -m monitoring.report) into $OUT/report
# Without MLflow on the machine the members train untracked and write their histories to
# $OUT/histories; the last lines say how to turn those into the same MLflow runs and report elsewhere.
#
# Environment: OUT (default runs/cifar_table6_gpu), LIMIT_S (570), PROBE_S (4), MEMBERS
# (plain20,plain56,resnet20,resnet56), CIFAR_MPS=1 (run the members under an MPS daemon started for this
# script: kernels of different processes then share the GPU at once instead of taking turns; decoding
# goes to the CPU then), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
STUDY=configs/study/cifar10_table6.toml
ARCHIVE=.gpudata/cifar10-jpeg.tar.gz
MEMBERS=${MEMBERS:-plain20,plain56,resnet20,resnet56}
PROBE_S=${PROBE_S:-4}
# Every member's settings for this run, as overrides of its config (the probe gets the same ones).
SETS=(progress=false tracking.log_model=false checkpoint.uri=/tmp/cifar-t6/checkpoints
      "output_dir=/tmp/cifar-t6/{name}")
WARM=(--warmup 30 --compile-warmup 10)
CPU=0
if [ "${1:-}" = --cpu ]; then
    # Toy sizes on the CPU: the digits set instead of CIFAR (10,000 test images take minutes to score on
    # two cores), 20 steps; everything else as on the GPU.
    CPU=1 OUT=${OUT:-runs/cifar_table6_cpu} LIMIT_S=${LIMIT_S:-3000}
    [ -f "$ARCHIVE" ] || ARCHIVE=../shared/datasets/cifar10-jpeg.tar.gz
    SETS+=(data.source=digits data.val_dir=val data.flip=false data.val_batch_size=0 data.batch_size=32
           data.num_threads=1 schedule.max_steps=20 "schedule.milestones=[10,15]" log_every=5
           "output_dir=/tmp/cifar-t6-cpu/{name}" checkpoint.uri=/tmp/cifar-t6-cpu/checkpoints)
    WARM=(--warmup 2 --compile-warmup 1)
fi
OUT=${OUT:-runs/cifar_table6_gpu}
LIMIT_S=${LIMIT_S:-570}
mkdir -p "$OUT"
OUT_ABS=$(cd "$OUT" && pwd)
T0=$SECONDS
say() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - T0))s] $*"; }

# -- 1. checks ----------------------------------------------------------------------------------------------
if [ ! -f "$ARCHIVE" ] && [ "$CPU" = 0 ]; then
    echo "error: $ARCHIVE is missing: copy ../shared/datasets/cifar10-jpeg.tar.gz there (the folder is git-ignored)"
    exit 2
fi
SETS+=("data.root=$ARCHIVE")
if ! CPU=$CPU "$PY" - >"$OUT/versions.txt" 2>&1 <<'EOF'
import os, sys, torch, deepspeed, nvidia.dali
assert os.environ["CPU"] == "1" or torch.cuda.is_available(), "no CUDA device visible"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, DeepSpeed {deepspeed.__version__}, "
      f"DALI {nvidia.dali.__version__}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")
EOF
then
    echo "error: torch (with CUDA), deepspeed and nvidia.dali must import (source /tmp/gpu-parts/gpu-env.sh first):"
    tail -5 "$OUT/versions.txt"
    exit 2
fi
say "$(tail -1 "$OUT/versions.txt")"
"$PY" -c "import psutil" 2>/dev/null || SETS+=(tracking.system_metrics=false)
MLFLOW_PORT=5077
SERVER_PID=
MPS=0
# shellcheck disable=SC2329  # called by the EXIT trap
cleanup() {
    local jobs_left=()
    # Whatever this script started and is still running (the MLflow server, probe processes after an interrupt).
    mapfile -t jobs_left < <(jobs -p)
    ((${#jobs_left[@]})) && kill "${jobs_left[@]}" 2>/dev/null
    [ "$MPS" = 1 ] && echo quit | nvidia-cuda-mps-control
    return 0
}
trap cleanup EXIT
if "$PY" -c "import mlflow, sqlalchemy, alembic" 2>/dev/null; then
    # One server owns the sqlite file: four training processes writing it directly would contend for its lock.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_TRACKING_URI="" "$PY" -m mlflow server --host 127.0.0.1 \
        --port "$MLFLOW_PORT" --workers 1 --backend-store-uri "sqlite:///$OUT_ABS/mlflow.db" \
        --artifacts-destination "$OUT_ABS/mlartifacts" >"$OUT/mlflow-server.log" 2>&1 &
    SERVER_PID=$!
    say "MLflow server starting on port $MLFLOW_PORT (store $OUT/mlflow.db)"
else
    say "MLflow is not importable here: members train untracked and write histories to $OUT/histories"
fi
if [ "${CIFAR_MPS:-0}" = 1 ] && [ "$CPU" = 0 ]; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/cifar-t6-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/cifar-t6-mps/log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d; then
        MPS=1
        SETS+=(data.decoder=cpu)  # the hardware JPEG decoder is not promised under MPS; 60k tiny JPEGs decode fast anyway
        say "MPS daemon started"
    else
        say "could not start the MPS daemon: the members take turns on the GPU instead"
    fi
fi
if [ -f "$ARCHIVE" ]; then
    say "extracting $ARCHIVE (once, into .cache/datasets)"
    "$PY" - "$ARCHIVE" <<'EOF' || exit 2
import sys
from pipeline.data.archive import extract_archive
from pipeline.tools.cifar10 import CIFAR10_SHA256
print(extract_archive(sys.argv[1], cache_dir=".cache/datasets", sha256=CIFAR10_SHA256))
EOF
fi

# -- 2. timing probe ----------------------------------------------------------------------------------------
IFS=, read -r -a NAMES <<<"$MEMBERS"
probe() {  # probe TAG: every member in its own process, alone then together; exit status of `project`
    local tag=$1 i=0 dir="$OUT/probe-$1" args=() s pids=()
    rm -rf "$dir" && mkdir -p "$dir"
    for s in "${SETS[@]}"; do args+=(--set "$s"); done
    for m in "${NAMES[@]}"; do
        timeout --kill-after=20 360 "$PY" benchmarks/throughput.py --config "configs/cifar10/cifar_$m.toml" "${args[@]}" \
            --probe-dir "$dir" --probe-slot "$i" --probe-slots "${#NAMES[@]}" --probe-seconds "$PROBE_S" \
            "${WARM[@]}" --out "$dir/probe.jsonl" >"$dir/$m.log" 2>&1 &
        pids+=($!)
        i=$((i + 1))
    done
    wait "${pids[@]}"
    touch "$dir/probe.jsonl"
    "$PY" benchmarks/study_parallel.py project "$dir/probe.jsonl" --limit-s "$LIMIT_S" --expect "${#NAMES[@]}" \
        --json "$dir/projection.json" \
        | tee "$OUT/projection-$tag.txt"
    return "${PIPESTATUS[0]}"
}
say "timing probe: ${MEMBERS} warm up (and compile), then ${PROBE_S} s each alone and ${PROBE_S} s all together"
probe main
rc=$?
PROJ="$OUT/probe-main/projection.json"
if [ "$rc" = 2 ]; then
    say "a probe process failed (logs in $OUT/probe-main/); probing again with model.compile_mode=default"
    SETS+=(model.compile_mode=default)
    probe default
    rc=$?
    PROJ="$OUT/probe-default/projection.json"
fi
if [ "$rc" = 3 ]; then
    say "ABORT: the projected wall time exceeds LIMIT_S = ${LIMIT_S} s (see above); the full run is not started."
    say "Options: CIFAR_MPS=1 (members share the GPU at once), fewer MEMBERS, or a larger LIMIT_S."
    exit 3
elif [ "$rc" != 0 ]; then
    say "ABORT: the probe failed (exit $rc); logs in $OUT/probe-*/"
    exit "$rc"
fi
PARALLEL=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['parallel'])" "$PROJ")

# -- 3. the full run ---------------------------------------------------------------------------------------
OVR=()
for s in "${SETS[@]}"; do OVR+=("--$s"); done
TRACK=(--no-mlflow --history-dir "$OUT/histories")
if [ -n "$SERVER_PID" ]; then
    for _ in $(seq 60); do
        "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$MLFLOW_PORT/health', timeout=2)" \
            2>/dev/null && { TRACK=(--report --report-out "$OUT/report"); break; }
        sleep 1
    done
    [ "${TRACK[0]}" = --report ] || say "the MLflow server did not come up ($OUT/mlflow-server.log): training untracked"
    OVR+=("--tracking.uri=http://127.0.0.1:$MLFLOW_PORT")
fi
say "full run: ${MEMBERS}, ${PARALLEL} at a time, stopped at $((LIMIT_S + 90)) s at the latest"
T1=$SECONDS
"$PY" benchmarks/study_parallel.py run "$STUDY" --only "$MEMBERS" --parallel "$PARALLEL" \
    --deadline-s $((LIMIT_S + 90)) --log-dir "$OUT/logs" "${TRACK[@]}" "${OVR[@]}" 2>&1 | tee "$OUT/run.txt"
rc=${PIPESTATUS[0]}
say "full run: exit $rc after $((SECONDS - T1)) s (projected $("$PY" -c \
    "import json, sys; print(round(json.load(open(sys.argv[1]))['best_s']))" "$PROJ") s)"

# -- 4. the report -----------------------------------------------------------------------------------------
if [ "${TRACK[0]}" = --no-mlflow ]; then
    IMPORT=("$PY" benchmarks/study_parallel.py import "$OUT/histories" "$STUDY")
    if "$PY" -c "import mlflow" 2>/dev/null; then
        "${IMPORT[@]}" --tracking-uri "sqlite:///$OUT_ABS/mlflow.db" --report-out "$OUT/report"
    else
        say "no MLflow here; on a machine with the project's venv run:"
        echo "  .venv/bin/python benchmarks/study_parallel.py import <OUT>/histories $STUDY \\"
        echo "      --tracking-uri sqlite:///<OUT>/mlflow.db --report-out <OUT>/report"
    fi
fi
say "done: report in $OUT/report, MLflow store $OUT/mlflow.db, member logs in $OUT/logs"
exit "$rc"
