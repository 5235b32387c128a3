#!/usr/bin/env bash
# One member of a depth study per array task, each on one node with G GPUs, with the same
# save -> requeue -> resume as slurm_resnet152.sh. pipeline.study writes the member list and submits:
#
#   python -m pipeline.study configs/study/imagenet_depth.toml --slurm
#   # which runs: sbatch --array=0-<n-1> --job-name=<study> launch/slurm_depth_study.sh MEMBERS_FILE
#
# MEMBERS_FILE holds one resolved member config (TOML path) per line; array task i trains line i+1.
# Each member config names its own run ("<study>_<member>"), so its checkpoint folder and MLflow child
# run survive requeues and resubmissions. Arguments after MEMBERS_FILE, and TRAIN_ARGS, are config
# overrides. GPUS_PER_NODE (required with SBATCH_GPUS_PER_NODE=0), CHECKPOINT_URI, MLFLOW_TRACKING_URI,
# SITE_ENV, SRUN_ARGS, LAUNCH_PREFIX, MAX_REQUEUES and TORCHRUN work as in slurm_resnet152.sh; LOG_DIR
# gets one task-<i>/ per member.
# sbatch options for every task go in SBATCH_* variables (they override the lines below), e.g.
# SBATCH_GPUS_PER_NODE=4 SBATCH_TIMELIMIT=12:00:00 python -m pipeline.study ... --slurm
#
#SBATCH --job-name=depth-study
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

: "${SLURM_JOB_ID:?submit this script with sbatch --array=...}"
cd "${SLURM_SUBMIT_DIR:-.}"
# shellcheck source=launch/slurm_lib.sh
source launch/slurm_lib.sh
site_defaults

members=${1:?usage: sbatch --array=0-N launch/slurm_depth_study.sh MEMBERS_FILE [--section.key=value ...]}
shift
task=${SLURM_ARRAY_TASK_ID:-0}
config=$(sed -n "$((task + 1))p" "$members")
if [[ -z $config ]]; then
  say "array task $task has no line $((task + 1)) in $members"
  exit 2
fi
job_name=${SLURM_JOB_NAME:-depth-study}
log_dir=${LOG_DIR:-logs/$job_name-${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}/task-$task
nproc=$(procs_per_node 1) || exit 2

overrides=()
add_overrides "$@"

say "array task $task of job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}:" \
  "$config on $(hostname) x $nproc processes, logs in $log_dir/"

rc=0
run_on_nodes "$log_dir" 1 launch/torchrun_node.sh --standalone --nnodes=1 --nproc_per_node="$nproc" \
  --max_restarts=0 pipeline/train.py --config "$config" "${overrides[@]}" || rc=$?
finish "$rc" "member $config"
