# shellcheck shell=bash
# Shared by the batch scripts (slurm_resnet152.sh, slurm_depth_study.sh); sourced, never run.
# sbatch copies a batch script into the node's spool directory, so the scripts source this file from
# the submission directory (the repository root), not from their own location.

readonly STOP_EXIT_CODE=75  # pipeline/core/stop.py: "stopped after a committed checkpoint, requeue me"

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

# Processes per node: GPUS_PER_NODE, else the job's --gpus-per-node ("a100:8" counts 8), else $1. A job
# without GPUs (--gpus-per-node=0, a CPU cluster) must say how many processes it wants in GPUS_PER_NODE.
# Prints the count, or explains and returns 2.
procs_per_node() {
  local gpus=${SLURM_GPUS_PER_NODE:-$1}
  if [[ -n ${GPUS_PER_NODE:-} ]]; then
    if [[ ! $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]]; then
      say "GPUS_PER_NODE=$GPUS_PER_NODE: expected the number of training processes per node (1 or more)"
      return 2
    fi
    echo "$GPUS_PER_NODE"
    return 0
  fi
  gpus=${gpus##*:}
  if [[ ! $gpus =~ ^[1-9][0-9]*$ ]]; then
    say "this job has no GPUs (--gpus-per-node=$gpus) and GPUS_PER_NODE is unset: set it to the number of" \
      "training processes per node, e.g. GPUS_PER_NODE=2 sbatch --gpus-per-node=0 ... (not requeued)"
    return 2
  fi
  echo "$gpus"
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
# returns srun's exit code, which alone cannot tell a stop from a failure (srun returns the highest of the
# nodes' codes, and a node whose peer failed is stopped by SIGTERM). So this restart gets a folder of its
# own, LOG_DIR/launch/job-<id>-restart-<n>/, where rank 0 writes stop.json (PIPELINE_STOP_RECORD,
# pipeline/core/stop.py) once every rank stopped with a committed checkpoint, and each node's
# launch/torchrun_node.sh writes its exit code (PIPELINE_NODE_STATUS_DIR). LOG_DIR must be on a
# filesystem every node shares, as for the logs themselves. `finish` reads both.
run_on_nodes() {
  local log_dir=$1 nodes=$2 n
  shift 2
  mkdir -p "$log_dir"
  launch_log_dir=$log_dir
  launch_dir=$log_dir/launch/job-$SLURM_JOB_ID-restart-${SLURM_RESTART_COUNT:-0}
  rm -rf "$launch_dir"
  mkdir -p "$launch_dir"
  export PIPELINE_STOP_RECORD=$launch_dir/stop.json PIPELINE_NODE_STATUS_DIR=$launch_dir
  # Where each node's log stands now: a failure report shows this restart's lines only (logs are appended).
  log_start=()
  mapfile -t launch_nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
  for n in "${launch_nodes[@]}"; do
    log_start+=("$(stat -c %s "$log_dir/$n.log" 2>/dev/null || echo 0)")
  done
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

# finish RC RUN: requeue this job when rank 0 recorded a stop with a committed checkpoint in this restart, or a
# node's launcher recorded a stop during the start-up and every node reports a stop, else exit with RC (0), or with the code of the node that failed first, its last error lines and log
# named at the end of the job's output.
finish() {
  local rc=$1 run=$2 restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-50}
  local record=${PIPELINE_STOP_RECORD:-}
  if [[ -n $record && -s $record ]] && grep -q '"by": "launcher' "$record" && ! every_node_stopped; then
    say "a node launcher recorded a stop before training started, but not every node reports a stop" \
      "($(tr -d '\n' <"$record"))"
    record=""
  fi
  if [[ -n $record && -s $record ]]; then
    local what="training stopped with a committed checkpoint"
    if grep -q '"by": "launcher' "$record"; then
      what="training was stopped during start-up, before any step (nothing to save)"
    fi
    if ((restarts >= max)); then
      say "$what, but this is restart $restarts (MAX_REQUEUES=$max): not requeueing"
      exit "$STOP_EXIT_CODE"
    fi
    say "$what ($(tr -d '\n' <"$record")): requeueing job $SLURM_JOB_ID to resume $run"
    # --requeue keeps the job id, hence the run id, the checkpoint folder and the MLflow run.
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    say "scontrol requeue failed: submit again to resume $run from its last committed checkpoint"
    exit "$STOP_EXIT_CODE"
  fi
  if ((rc == 0)); then
    exit 0
  fi
  report_failure "$rc" "$run"
}

# every_node_stopped: whether every node of this restart wrote "<code> stopped" (launch/torchrun_node.sh). A stop
# recorded by a node's launcher (a stop during the rendezvous) is a stop only when no node failed or vanished.
every_node_stopped() {
  local n c kind
  for n in "${launch_nodes[@]}"; do
    read -r c kind <"$launch_dir/node-$n.exit" 2>/dev/null || return 1
    [[ $kind == stopped ]] || return 1
  done
}

# report_failure RC RUN: the nodes that failed (earliest first) with their last error lines, then one line
# naming the first one, its exit code and log; exits with that code (RC when no node reported one).
report_failure() {
  local rc=$1 run=$2 code=$1 first="" follower="" follower_code="" i n f c kind log
  local -A failed=()
  if [[ -n ${launch_dir:-} && -d $launch_dir ]]; then
    while read -r f; do
      read -r c kind <"$launch_dir/$f" || continue
      n=${f#node-}
      n=${n%.exit}
      if [[ $kind == failed* ]]; then
        failed[$n]=$c
        # A node whose ranks failed because a peer died ("failed peer") only followed: the first node that failed
        # on its own is named, though the follower's collective may have noticed first.
        if [[ $kind == "failed peer" ]]; then
          follower=${follower:-$n} follower_code=${follower_code:-$c}
        elif [[ -z $first ]]; then
          first=$n code=$c
        fi
      fi
    done < <(cd "$launch_dir" && ls -tr -- node-*.exit 2>/dev/null)
  fi
  if [[ -z $first && -n $follower ]]; then
    first=$follower code=$follower_code
  fi
  for i in "${!launch_nodes[@]}"; do
    n=${launch_nodes[$i]}
    log=$launch_log_dir/$n.log
    if [[ -n ${failed[$n]:-} ]]; then
      say "node $n failed (exit ${failed[$n]}); its last error lines ($log):"
      node_errors "$log" "${log_start[$i]}"
    elif [[ ! -e $launch_dir/node-$n.exit ]]; then
      say "node $n reported no exit (killed, or lost; see $log)"
    fi
  done
  if ((rc == STOP_EXIT_CODE)) && [[ -z $first ]]; then
    say "training exited $rc, but no stop record ($PIPELINE_STOP_RECORD) says every rank stopped with a" \
      "committed checkpoint: not requeueing"
  fi
  say "training failed (exit $code)${first:+ on node $first, log $launch_log_dir/$first.log}: not requeued;" \
    "submitting again resumes $run from its last committed checkpoint"
  exit "$code"
}

# node_errors LOG OFFSET: the lines of LOG after byte OFFSET (this restart's) that report an error, the last 12
# (or its last 12 lines when none does), cut at 300 characters. Error lines: a traceback and its exception line,
# an "error:"/"Error:" line, a logged ERROR or CRITICAL, a launcher's exit reason, a killed process, SLURM's own;
# never a progress line, which has "| error 52.19% |" in every one.
node_errors() {
  local lines
  lines=$(tail -c +"$(($2 + 1))" "$1" 2>/dev/null | tail -n 400 |
    grep -aE '(^|[ (])(error|Error)( \(rank [0-9]+\))?: |\b(ERROR|CRITICAL|FATAL)\b|^Traceback |^[A-Za-z_.]*(Error|Exception|Interrupt)(: |$)|launch: .*(exit|failed|killed|died)|[Kk]illed|Aborted|Segmentation fault|slurmstepd: ' |
    grep -avE '\| (top-1 |top-5 )?error [0-9.]+% \|' | tail -n 12 || true)
  if [[ -z $lines ]]; then
    lines=$(tail -c +"$(($2 + 1))" "$1" 2>/dev/null | tail -n 12 || true)
  fi
  printf '%s\n' "$lines" | cut -c1-300 | sed 's/^/    | /' >&2
}
