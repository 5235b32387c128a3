#!/usr/bin/env bash
# One node's share of a job: run torchrun with the given arguments, make sure a stop request reaches
# the training processes, and exit 75 ("stopped after saving: requeue me") when one did.
#
#   launch/torchrun_node.sh TORCHRUN_ARGS...       # srun starts one of these per node
#
# Why a wrapper and not `exec torchrun`:
# - SLURM's warning signal (sbatch --signal=USR1@T, scancel --signal=USR1) is USR1. torchrun does not
#   handle USR1, whose default action kills it, and its workers are then orphaned mid-step. torchrun is
#   therefore started with USR1 ignored; its workers install their own handler (pipeline/core/stop.py).
# - A signal may reach only this wrapper (a site whose process tracking signals the task, not every
#   process of the step), so the wrapper passes the stop on as SIGTERM, which the workers treat like
#   USR1. It signals the workers themselves, not torchrun: torchrun answers SIGTERM by killing its
#   workers after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s, not settable before torch 2.12), which can cut
#   a checkpoint upload short.
# - The workers log which signal stopped them: before the SIGTERM the wrapper writes the signal it got
#   (e.g. SIGUSR1) to the file named in PIPELINE_STOP_SIGNAL_FILE, which pipeline/core/stop.py reads.
# - torchrun reports any non-zero worker exit, 75 included, as 1, with a 25-line Python traceback and a
#   failure table (and a signal that reaches torchrun itself with a traceback of its own internals, which
#   the wrapper turns into one line naming the signal). The wrapper reads torchrun's stderr: when every
#   failed worker exited 75 (stopped after saving; torchrun may end the last ones by SIGTERM while they
#   finish, or srun end the step after another node stopped) it drops that report and exits 75;
#   otherwise it replaces it with one line per failed rank and exits with the failed worker's own code (2
#   for a config error), not torchrun's 1, even when a stop request (srun killing the step after another
#   node failed) reached it too. (Not when stderr is a terminal: there torchrun writes to it directly, so
#   the training still sees a terminal.)
# - With PIPELINE_NODE_STATUS_DIR set (launch/slurm_lib.sh), the wrapper writes "<exit code> <finished|
#   stopped|failed|failed peer>" to node-<node>.exit there ("failed peer": its workers failed because a peer
#   died), so the batch script can name the node that failed first and the code it failed with.
# - A stop before the workers can take it still ends in a requeue: in the rendezvous (no worker yet) the
#   wrapper ends torchrun and writes the stop record itself (pipeline/core/stop.py); while the workers still
#   import (no SIGTERM handler yet) it writes the signal file, which they read when they install their handler.
# - When torchrun is ended by a signal it reports no exit codes: a worker's own "error ..." line (a peer's
#   death, a broken collective) then makes the node a failure, not a stop.
# SIGTERM that reaches torchrun directly (preemption, scancel) still follows torchrun's own rule:
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT bounds the save.
set -euo pipefail


readonly STOP_EXIT_CODE=75  # pipeline/core/stop.py STOP_EXIT_CODE
torchrun=${TORCHRUN:-torchrun}
node=$(hostname -s 2>/dev/null || hostname)
stop_signal=""
stopped_before_workers=""
torchrun_pid=""
work=$(mktemp -d "${TMPDIR:-/tmp}/torchrun_node.XXXXXX")
trap 'rm -rf "$work"' EXIT
export PIPELINE_STOP_SIGNAL_FILE=$work/stop-signal  # pipeline/core/stop.py SIGNAL_FILE_ENV
failures=$work/failures                             # "code rank host" per failed worker, root cause first
worker_errors=$work/worker-errors                   # the workers' own "error (rank N): ..." lines

say() { printf '%s %s launch: %s\n' "$(date '+%F %T')" "$node" "$*" >&2; }

# handles_term PID: whether the process has a SIGTERM handler installed (SigCgt in /proc/PID/status).
handles_term() {
  local mask
  mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
  [[ -n $mask ]] && (((16#$mask >> 14) & 1))  # bit 14: signal 15
}

pass_stop_on() {
  if [[ -n $stop_signal ]]; then
    return 0  # the workers already have it; a second one would only be logged by them
  fi
  stop_signal=$1
  # Written first, whatever follows: a worker that installs its handler after the check below reads the stop
  # here (pipeline/core/stop.py StopFlag.install), and a SIGTERMed one names the signal that was really sent.
  printf 'SIG%s\n' "$1" >"$PIPELINE_STOP_SIGNAL_FILE"
  if [[ -z $torchrun_pid ]]; then
    return 0  # torchrun not started yet: the check after it starts passes the stop on
  fi
  local workers pid ready=() later=()
  workers=$(pgrep -P "$torchrun_pid" || true)
  if [[ -z $workers ]]; then
    # Still in the rendezvous (which may wait RDZV_TIMEOUT for the other nodes): nothing trained, nothing to save.
    say "SIG$1 with no worker running: stopping torchrun (nothing to save)"
    stopped_before_workers=1
    kill -TERM "$torchrun_pid" 2>/dev/null || true
    return 0
  fi
  for pid in $workers; do
    if handles_term "$pid"; then ready+=("$pid"); else later+=("$pid"); fi
  done
  # A worker still importing has no handler yet: SIGTERM would kill it; it reads the file when it installs one.
  local starting=""
  if ((${#later[@]})); then
    starting="; pids ${later[*]} are still starting: they take the stop when their handler is installed"
  fi
  say "SIG$1: asking the workers to save and stop (SIGTERM to pids ${ready[*]:-none}$starting)"
  if ((${#ready[@]})); then
    kill -TERM "${ready[@]}" 2>/dev/null || true
  fi
}

# filter_report: torchrun's stderr (the workers' too, they inherit it) passed through line by line, except
# torchrun's own failure report: its Python traceback (torchrun's internals, never the workers' error) and
# its failure table are held back and read; the failed workers go to $failures. A report of workers that
# all exited 75 (stopped after saving) is dropped; any other becomes one line per failed worker.
filter_report() {
  local line state=pass borders=0 section="" rank="" host="" code
  local held=() found=()
  while IFS= read -r line || [[ -n $line ]]; do
    case $state in
      pass)
        if [[ $line == "Traceback (most recent call last):" ]]; then
          state=traceback held=("$line")
        elif [[ ! $line =~ elastic/multiprocessing/api\.py:[0-9]+\]\ failed\ \(exitcode:\ 75\) ]]; then
          printf '%s\n' "$line"  # (torchrun's one-line note of an exit 75 waits for the report's verdict)
          if [[ $line =~ ^error(\ \(rank\ [0-9]+\))?:\  ]]; then
            # A worker's last word before a failing exit (pipeline/core/errors.py error_line): when torchrun is
            # ended by a signal it reports no exit codes, and this is what tells a failure from a stop.
            printf '%s\n' "$line" >>"$worker_errors"
          fi
        fi
        ;;
      traceback)
        if [[ $line == " "* ]]; then
          held+=("$line")
        elif [[ $line == torch.distributed.elastic.multiprocessing.errors.ChildFailedError* ]]; then
          state=report borders=0 section="" found=()
          held+=("$line")
        elif [[ $line =~ ^torch\.distributed\.elastic\.multiprocessing\.api\.SignalException:.*signal:\ *([0-9]+) ]] &&
          [[ ${held[*]} == *torch/distributed/run.py* ]]; then
          # torchrun itself got a signal (srun ending the step after another node stopped or failed, scancel,
          # preemption): its traceback shows only its own internals. It ends its workers; what they did decides
          # the exit code, as for any stop.
          say "torchrun got SIG$(kill -l "${BASH_REMATCH[1]}" 2>/dev/null || echo "${BASH_REMATCH[1]}") and ended its workers"
          state=pass held=()
        else  # a worker's traceback: pass it on whole
          printf '%s\n' "${held[@]}" "$line"
          state=pass held=()
        fi
        ;;
      report)
        held+=("$line")
        if [[ $line =~ ^=+$ ]]; then
          borders=$((borders + 1))
        elif [[ $line == "Root Cause"* ]]; then
          section=root
        elif [[ $line =~ ^\ +host\ +:\ *(.*)$ ]]; then
          host=${BASH_REMATCH[1]}
        elif [[ $line =~ ^\ +rank\ +:\ *([0-9]+) ]]; then
          rank=${BASH_REMATCH[1]}
        elif [[ $line =~ ^\ +exitcode\ +:\ *(-?[0-9]+) ]]; then
          code=${BASH_REMATCH[1]}
          if ((code < 0)); then
            code=$((128 - code))  # killed by signal N: the shell's 128+N
          fi
          if [[ $section == root ]]; then
            found=("$code $rank $host" "${found[@]}")
          else
            found+=("$code $rank $host")
          fi
        fi
        if ((borders == 2)); then
          printf '%s\n' "${found[@]}" >"$failures"
          if [[ $(verdict <"$failures") != stopped ]]; then
            for f in "${found[@]}"; do
              read -r code rank host <<<"$f"
              say "torchrun: worker rank $rank on $host exited with code $code"
            done
          fi
          state=pass held=()
        fi
        ;;
    esac
  done
  if ((${#held[@]})); then
    printf '%s\n' "${held[@]}"  # cut short: show what came
  fi
}

# peer_ranks: the ranks whose own error line says they failed because a peer died (rank 0's line names no rank).
peer_ranks() {
  local line
  [[ -s $worker_errors ]] || return 0
  while IFS= read -r line; do
    if [[ $line =~ ^error\ \(rank\ ([0-9]+)\):\ a\ peer\ died ]]; then
      echo "${BASH_REMATCH[1]}"
    elif [[ $line == "error: a peer died"* ]]; then
      echo 0
    fi
  done <"$worker_errors"
}

# verdict: reads "code rank host" lines (torchrun's failed workers, root cause first); prints "stopped" when
# they stopped after saving: every one exited 75, or some did and torchrun then ended the others (SIGTERM,
# SIGKILL: 143, 137) while they were finishing too; else "failed CODE RANK HOST" for the first real failure.
verdict() {
  local code rank host saved=0 killed="" follower="" peers
  peers=" $(peer_ranks) "
  while read -r code rank host; do
    if ((code == STOP_EXIT_CODE)); then
      saved=1
    elif ((code == 143 || code == 137)); then
      killed=${killed:-"$code $rank $host"}
    elif [[ $peers == *" $rank "* ]]; then
      follower=${follower:-"$code $rank $host"}  # failed because a peer died: a worker killed here is the cause
    else
      echo "failed $code $rank $host"
      return 0
    fi
  done
  if [[ -n $follower ]]; then
    echo "failed ${killed:-$follower}"
    return 0
  fi
  if ((saved)) || [[ -z $killed ]]; then
    echo stopped
  else
    echo "failed $killed"
  fi
}

trap 'pass_stop_on USR1' USR1
trap 'pass_stop_on TERM' TERM
trap 'pass_stop_on INT' INT

# Ignored signals stay ignored across exec: torchrun survives USR1, its workers replace the handler.
filter_pid=""
if [[ -t 2 ]]; then
  # A terminal: someone is watching (and the training draws its progress bar only on a terminal).
  (trap '' USR1 && exec "$torchrun" "$@") &
else
  mkfifo "$work/stderr"
  # The filter outlives every stop signal (a dead reader would make the workers' next write fail mid-save).
  (trap '' USR1 TERM INT && filter_report <"$work/stderr" >&2) &
  filter_pid=$!
  (trap '' USR1 && exec "$torchrun" "$@" 2>"$work/stderr") &
fi
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
# The filter ends when the last writer (torchrun, any straggling worker) has gone; a straggler gets 10 s.
if [[ -n $filter_pid ]]; then
  for _ in $(seq 100); do
    kill -0 "$filter_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill "$filter_pid" 2>/dev/null || true
  wait "$filter_pid" 2>/dev/null || true
fi

status() {  # the node's outcome for the batch script (launch/slurm_lib.sh)
  if [[ -n ${PIPELINE_NODE_STATUS_DIR:-} ]]; then
    printf '%s %s\n' "$1" "$2" >"$PIPELINE_NODE_STATUS_DIR/node-${SLURMD_NODENAME:-$node}.exit" || true
  fi
}

# record_early_stop: the stop record (pipeline/core/stop.py) for a stop that came before any worker existed, so
# that the batch script requeues the job; never over rank 0's record of a committed stop.
record_early_stop() {
  local record=${PIPELINE_STOP_RECORD:-} tmp
  if [[ -z $record || -e $record ]]; then
    return 0
  fi
  tmp=$record.$node.tmp
  printf '{"step": null, "signal": "SIG%s", "checkpoint": "", "run_id": "", "by": "launcher %s", "time": "%s"}\n' \
    "$stop_signal" "$node" "$(date '+%Y-%m-%dT%H:%M:%S%z')" >"$tmp" && mv -f "$tmp" "$record" || true
  say "stopped before any worker started: recorded the stop in $record (nothing to save)"
}

if ((rc == 0)); then
  status 0 finished
  exit 0
fi
failed=""
if [[ -s $failures ]]; then
  failed=$(verdict <"$failures")
  failed=${failed#stopped}
  failed=${failed#failed }
elif [[ -s $worker_errors ]]; then
  # torchrun was ended by a signal (srun ending the step after another node failed) and reported no exit
  # codes, but a worker failed on its own before that (a peer's crash, a broken collective): not a stop.
  first_error=$(head -n 1 "$worker_errors")
  rank=0
  if [[ $first_error =~ ^error\ \(rank\ ([0-9]+)\) ]]; then
    rank=${BASH_REMATCH[1]}
  fi
  failed="1 $rank $node"
fi
peer=""
if [[ -n $failed && " $(peer_ranks | tr '\n' ' ') " == *" $(cut -d' ' -f2 <<<"$failed") "* ]]; then
  peer=" because a peer died (another rank's process ended; the first failed node's log has the cause)"
fi
if [[ -z $failed && ( -n $stop_signal || -s $failures ) ]]; then
  if [[ -n $stop_signal ]]; then
    say "torchrun exited $rc after SIG$stop_signal: exit $STOP_EXIT_CODE (stopped; resume from the last" \
      "committed checkpoint)"
  else
    say "every worker stopped with exit $STOP_EXIT_CODE: exit $STOP_EXIT_CODE (resume from the last committed" \
      "checkpoint)"
  fi
  if [[ -n $stopped_before_workers ]]; then
    record_early_stop
  fi
  status "$STOP_EXIT_CODE" stopped
  exit "$STOP_EXIT_CODE"
fi
if [[ -n $failed ]]; then
  read -r code rank host <<<"$failed"
  say "torchrun failed: worker rank $rank on $host exited with code $code$peer:" \
    "exit $code${stop_signal:+ (a SIG$stop_signal came too; it is not a stop)}"
  status "$code" "failed${peer:+ peer}"
  exit "$code"
fi
say "torchrun failed with exit code $rc"
status "$rc" failed
exit "$rc"
