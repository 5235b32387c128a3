#!/usr/bin/env bash
# One node's share of a job: run torchrun with the given arguments, make sure a stop request reaches
# the training processes, and exit 75 ("stopped after saving: requeue me") when one did.
#
#   launch/torchrun_node.sh TORCHRUN_ARGS...       # srun starts one of these per node
#
# Why a wrapper and not `exec torchrun`:
# - SLURM's warning signal (sbatch --signal=USR1@T, scancel --signal=USR1) is USR1. torchrun does not
#   handle USR1, whose default action kills it, and its workers are then orphaned mid-step. torchrun is
#   therefore started with USR1 ignored; its workers install their own handler (pipeline/signals.py).
# - A signal may reach only this wrapper (a site whose process tracking signals the task, not every
#   process of the step), so the wrapper passes the stop on as SIGTERM, which the workers treat like
#   USR1. It signals the workers themselves, not torchrun: torchrun answers SIGTERM by killing its
#   workers after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s, not settable before torch 2.12), which can cut
#   a checkpoint upload short.
# - torchrun reports any non-zero worker exit, 75 included, as 1; the wrapper knows it asked for a
#   stop and restores 75 for the batch script.
# SIGTERM that reaches torchrun directly (preemption, scancel) still follows torchrun's own rule:
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT bounds the save.
set -euo pipefail

readonly STOP_EXIT_CODE=75  # pipeline/signals.py STOP_EXIT_CODE
torchrun=${TORCHRUN:-torchrun}
node=$(hostname -s 2>/dev/null || hostname)
stop_signal=""
torchrun_pid=""

say() { printf '%s %s launch: %s\n' "$(date '+%F %T')" "$node" "$*" >&2; }

pass_stop_on() {
  if [[ -n $stop_signal ]]; then
    return 0  # the workers already have it; a second one would only be logged by them
  fi
  stop_signal=$1
  if [[ -z $torchrun_pid ]]; then
    return 0  # torchrun not started yet: the check after it starts passes the stop on
  fi
  local workers
  workers=$(pgrep -P "$torchrun_pid" || true)
  if [[ -n $workers ]]; then
    say "SIG$1: asking the workers to save and stop (SIGTERM to pids $(echo "$workers" | tr '\n' ' '))"
    # shellcheck disable=SC2086 # one pid per word
    kill -TERM $workers 2>/dev/null || true
  else
    say "SIG$1 before any worker started: stopping torchrun (nothing to save yet)"
    kill -TERM "$torchrun_pid" 2>/dev/null || true
  fi
}

trap 'pass_stop_on USR1' USR1
trap 'pass_stop_on TERM' TERM
trap 'pass_stop_on INT' INT

# Ignored signals stay ignored across exec: torchrun survives USR1, its workers replace the handler.
(trap '' USR1 && exec "$torchrun" "$@") &
torchrun_pid=$!
if [[ -n $stop_signal ]]; then
  pending=$stop_signal
  stop_signal=""
  pass_stop_on "$pending"
fi

# `wait` returns early whenever a trapped signal arrives; keep waiting until torchrun has really exited.
while :; do
  rc=0
  wait "$torchrun_pid" || rc=$?
  if ! kill -0 "$torchrun_pid" 2>/dev/null; then
    break
  fi
done

if ((rc == 0)); then
  exit 0
fi
if [[ -n $stop_signal ]]; then
  say "torchrun exited $rc after SIG$stop_signal: exit $STOP_EXIT_CODE (stopped; resume from the last committed checkpoint)"
  exit "$STOP_EXIT_CODE"
fi
say "torchrun failed with exit code $rc"
exit "$rc"
