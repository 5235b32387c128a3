#!/usr/bin/env bash
# Train on this machine, one process per GPU (or NPROC_PER_NODE processes on the CPU).
#
#   launch/torchrun_local.sh configs/cpu/digits_resnet20.toml
#   NPROC_PER_NODE=4 launch/torchrun_local.sh configs/imagenet/resnet50.toml --optim.lr=0.2
#
# A stop request (kill -USR1 or -TERM to this script's pid) makes the training save and exit 75;
# running the same command again resumes from the last committed checkpoint (the run id comes from
# the config's name, or --run_id=...).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $# -eq 0 || $1 == -* ]]; then
  echo "usage: $0 CONFIG.toml [--section.key=value ...]" >&2
  exit 2
fi
config=$1
shift

if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if ((gpus > 0)); then
      NPROC_PER_NODE=$gpus
    fi
  fi
fi

# --standalone: a private rendezvous on a free local port, so several local runs never collide.
exec launch/torchrun_node.sh --standalone --nnodes=1 --nproc_per_node="$NPROC_PER_NODE" --max_restarts=0 \
  pipeline/train.py --config "$config" "$@"
