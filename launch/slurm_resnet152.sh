#!/usr/bin/env bash
# ResNet-152 across N nodes x G GPUs: one torchrun per node, a c10d rendezvous on the first node, and
# save -> requeue -> resume when SLURM warns of the time limit or of preemption.
#
#   mkdir -p logs && sbatch launch/slurm_resnet152.sh                        # 4 nodes x 8 GPUs
#   sbatch --nodes=2 --gpus-per-node=4 launch/slurm_resnet152.sh --optim.lr=0.2
#   CONFIG=configs/imagenet/resnet50.toml CHECKPOINT_URI=s3://bucket/ckpt \
#     MLFLOW_TRACKING_URI=http://mlflow:5000 sbatch launch/slurm_resnet152.sh
#
# Submit from the repository root (the job runs there; logs/ must exist). Arguments after the script
# name, and TRAIN_ARGS, are config overrides (--section.key=value) passed to pipeline/train.py.
#
# Environment (read at submission; sbatch exports the caller's environment to the job):
#   CONFIG           experiment file                  [configs/imagenet/resnet152.toml]
#   GPUS_PER_NODE    processes per node               [the job's --gpus-per-node, else 8]
#   CHECKPOINT_URI   --checkpoint.uri (s3://bucket/prefix, a shared folder, ...)   [the config's]
#   MLFLOW_TRACKING_URI  --tracking.uri                [the config's, else sqlite:///mlflow.db]
#   TRAIN_ARGS       more overrides, split on spaces
#   RUN_ID           stable run id: checkpoint folder and MLflow run survive requeues [<job name>-<job id>]
#   LOG_DIR          per-node logs                     [logs/<job name>-<job id>]
#   RDZV_PORT        rendezvous port on the first node [20000 + job id % 10000]
#   RDZV_TIMEOUT     seconds every node has to join    [600]
#   MAX_REQUEUES     give up requeueing after this many restarts   [50]
#   SITE_ENV         a file sourced first: a site's NCCL/network settings override the defaults below
#   SRUN_ARGS        extra srun options, e.g. --container-image=... for pyxis/enroot
#   LAUNCH_PREFIX    a command put before the node launcher, e.g. "apptainer exec --nv image.sif"
#   TORCHRUN         the torchrun executable           [torchrun from PATH]
#
#SBATCH --job-name=resnet152
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# --signal=USR1@300 (no "B:") signals every process of the job steps 300 s (up to 360 s) before the
# time limit; that is when the training saves and exits 75. Sites that want the same at preemption
# set SlurmctldParameters=preempt_send_user_signal. --requeue lets `scontrol requeue` put the job back
# in the queue with the same job id, so RUN_ID, the checkpoint folder and the MLflow run stay the same.
set -euo pipefail

readonly STOP_EXIT_CODE=75
say() { printf '%s batch: %s\n' "$(date '+%F %T')" "$*" >&2; }

: "${SLURM_JOB_ID:?run this script with sbatch (or inside an allocation: salloc ... bash $0)}"
cd "${SLURM_SUBMIT_DIR:-.}"

if [[ -n ${SITE_ENV:-} ]]; then
  # shellcheck source=/dev/null
  source "$SITE_ENV"
fi
# Defaults a site can override (SITE_ENV, or exported before sbatch):
: "${NCCL_DEBUG:=WARN}"
# A dead peer makes NCCL calls raise instead of blocking until the collective timeout.
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
# Time torchrun gives workers to finish a save after a SIGTERM of its own (preemption): the job's
# --signal lead time (300 s) minus margin. Ignored by torch < 2.12 (fixed 30 s).
: "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:=240}"
export NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_ELASTIC_SHUTDOWN_TIMEOUT

config=${CONFIG:-configs/imagenet/resnet152.toml}
job_name=${SLURM_JOB_NAME:-resnet152}
if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
  job_tag=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
else
  job_tag=$SLURM_JOB_ID
fi
run_id=${RUN_ID:-$job_name-$job_tag}
log_dir=${LOG_DIR:-logs/$job_name-$job_tag}
num_nodes=${SLURM_JOB_NUM_NODES:-1}
gpus=${SLURM_GPUS_PER_NODE:-8}
nproc=${GPUS_PER_NODE:-${gpus##*:}}  # --gpus-per-node=a100:8 arrives as "a100:8"
rdzv_port=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
restarts=${SLURM_RESTART_COUNT:-0}
max_requeues=${MAX_REQUEUES:-50}

mapfile -t nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
rdzv_host=${nodes[0]}

overrides=(--run_id="$run_id")
if [[ -n ${CHECKPOINT_URI:-} ]]; then
  overrides+=(--checkpoint.uri="$CHECKPOINT_URI")
fi
if [[ -n ${MLFLOW_TRACKING_URI:-} ]]; then
  overrides+=(--tracking.uri="$MLFLOW_TRACKING_URI")
fi
if [[ -n ${TRAIN_ARGS:-} ]]; then
  read -r -a extra <<<"$TRAIN_ARGS"
  overrides+=("${extra[@]}")
fi
overrides+=("$@")

mkdir -p "$log_dir"
say "job $job_tag ($job_name) restart $restarts: ${#nodes[@]} nodes [${nodes[*]}] x $nproc processes," \
  "rendezvous $rdzv_host:$rdzv_port, run id $run_id, config $config, node logs in $log_dir/"

srun_args=(--nodes="$num_nodes" --ntasks-per-node=1 --kill-on-bad-exit=1
  --output="$log_dir/%N.log" --open-mode=append)
# A step gets one CPU per task unless told otherwise; torchrun's workers and DALI need the whole node.
if [[ -n ${SLURM_CPUS_ON_NODE:-} ]]; then
  srun_args+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
fi
if [[ -n ${SRUN_ARGS:-} ]]; then
  read -r -a extra_srun <<<"$SRUN_ARGS"
  srun_args+=("${extra_srun[@]}")
fi
prefix=()
if [[ -n ${LAUNCH_PREFIX:-} ]]; then
  read -r -a prefix <<<"$LAUNCH_PREFIX"
fi

# --max_restarts=0: a worker's exit 75 must end this run (and be requeued), not restart it in place.
srun "${srun_args[@]}" "${prefix[@]}" launch/torchrun_node.sh \
  --nnodes="$num_nodes" --nproc_per_node="$nproc" \
  --rdzv_backend=c10d --rdzv_endpoint="$rdzv_host:$rdzv_port" --rdzv_id="$SLURM_JOB_ID" \
  --rdzv_conf=join_timeout="${RDZV_TIMEOUT:-600}" --max_restarts=0 \
  pipeline/train.py --config "$config" "${overrides[@]}" &
srun_pid=$!

# The steps get USR1 from SLURM directly; this trap covers a signal sent to the batch shell alone
# (sbatch --signal=B:USR1@T, scancel --batch) by passing it on to every step.
trap 'say "USR1 on the batch shell: passing it to the job steps"; scancel --signal=USR1 "$SLURM_JOB_ID" || true' USR1
while :; do
  rc=0
  wait "$srun_pid" || rc=$?
  if ! kill -0 "$srun_pid" 2>/dev/null; then
    break
  fi
done

if ((rc == STOP_EXIT_CODE)); then
  if ((restarts >= max_requeues)); then
    say "stopped with a committed checkpoint, but restart $restarts reached MAX_REQUEUES=$max_requeues: not requeueing"
    exit "$STOP_EXIT_CODE"
  fi
  say "training stopped with a committed checkpoint: requeueing job $SLURM_JOB_ID to resume run $run_id"
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
  fi
  say "scontrol requeue failed: resubmit with RUN_ID=$run_id to resume"
  exit "$STOP_EXIT_CODE"
fi
if ((rc != 0)); then
  say "training failed (srun exit $rc); node logs: $log_dir/. Resubmitting with RUN_ID=$run_id resumes from its last committed checkpoint."
fi
exit "$rc"
