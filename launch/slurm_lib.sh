# shellcheck shell=bash
# Shared by the batch scripts (slurm_resnet152.sh, slurm_depth_study.sh); sourced, never run.
# sbatch copies a batch script into the node's spool directory, so the scripts source this file from
# the submission directory (the repository root), not from their own location.

readonly STOP_EXIT_CODE=75  # pipeline/signals.py: "stopped after a committed checkpoint, requeue me"

say() { printf '%s batch: %s\n' "$(date '+%F %T')" "$*" >&2; }

# Site settings first, then defaults for what the site left unset (exported before sbatch or set in
# SITE_ENV: sbatch passes the submitting shell's environment to the job).
site_defaults() {
  if [[ -n ${SITE_ENV:-} ]]; then
    # shellcheck source=/dev/null
    source "$SITE_ENV"
  fi
  : "${NCCL_DEBUG:=WARN}"
  # A dead peer makes NCCL calls raise instead of blocking until the collective timeout.
  : "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
  # How long torchrun lets workers finish a save after it gets SIGTERM itself (preemption without
  # preempt_send_user_signal, scancel): below the --signal lead time. torch < 2.12 ignores it (30 s).
  : "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:=240}"
  export NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_ELASTIC_SHUTDOWN_TIMEOUT
}

# Processes per node: GPUS_PER_NODE, else the job's --gpus-per-node ("a100:8" counts 8), else $1.
procs_per_node() {
  local gpus=${SLURM_GPUS_PER_NODE:-$1}
  echo "${GPUS_PER_NODE:-${gpus##*:}}"
}

# add_overrides ARGS...: append to the caller's `overrides` array the config overrides for
# pipeline/train.py that every batch script takes, in this order: CHECKPOINT_URI, MLFLOW_TRACKING_URI,
# TRAIN_ARGS (split on spaces), then ARGS (the script's own arguments).
add_overrides() {
  local extra=()
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
}

# run_on_nodes LOG_DIR NODES COMMAND...: one task per node, each node's output in LOG_DIR/<node>.log;
# returns srun's exit code (75 when the training stopped to be requeued).
run_on_nodes() {
  local log_dir=$1 nodes=$2
  shift 2
  mkdir -p "$log_dir"
  local args=(--nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1
    --output="$log_dir/%N.log" --open-mode=append)
  # A step gets one CPU per task unless told otherwise; torchrun's workers and DALI need the node.
  if [[ -n ${SLURM_CPUS_ON_NODE:-} ]]; then
    args+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
  fi
  local extra=() prefix=()
  if [[ -n ${SRUN_ARGS:-} ]]; then
    read -r -a extra <<<"$SRUN_ARGS"
  fi
  if [[ -n ${LAUNCH_PREFIX:-} ]]; then
    read -r -a prefix <<<"$LAUNCH_PREFIX"
  fi
  srun "${args[@]}" "${extra[@]}" "${prefix[@]}" "$@" &
  local srun_pid=$!
  # The steps get USR1 from SLURM directly (--signal without "B:"). This covers a signal sent to the
  # batch shell alone (--signal=B:USR1@T, scancel --batch) by passing it on to every step.
  # shellcheck disable=SC2064 # the job id is fixed: expand it now
  trap "say 'USR1 on the batch shell: passing it to the job steps'; scancel --signal=USR1 $SLURM_JOB_ID || true" USR1
  local rc
  # `wait` returns early when a trapped signal arrives; wait until srun has really exited.
  while :; do
    rc=0
    wait "$srun_pid" || rc=$?
    if ! kill -0 "$srun_pid" 2>/dev/null; then
      break
    fi
  done
  trap - USR1
  return "$rc"
}

# finish RC RUN: requeue this job when the training stopped to be requeued, else exit with RC.
finish() {
  local rc=$1 run=$2 restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-50}
  if ((rc == STOP_EXIT_CODE)); then
    if ((restarts >= max)); then
      say "stopped with a committed checkpoint, but this is restart $restarts (MAX_REQUEUES=$max): not requeueing"
      exit "$STOP_EXIT_CODE"
    fi
    say "training stopped with a committed checkpoint: requeueing job $SLURM_JOB_ID to resume $run"
    # --requeue keeps the job id, hence the run id, the checkpoint folder and the MLflow run.
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    say "scontrol requeue failed: submit again to resume $run from its last committed checkpoint"
    exit "$STOP_EXIT_CODE"
  fi
  if ((rc != 0)); then
    say "training failed (exit $rc); see the node logs. Submitting again resumes $run from its last committed checkpoint."
  fi
  exit "$rc"
}
