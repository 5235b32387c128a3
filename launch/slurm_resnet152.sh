#!/usr/bin/env bash
# ResNet-152 across N nodes x G GPUs: one torchrun per node, a c10d rendezvous on the first node, and
# save -> requeue -> resume when SLURM warns of the time limit (or of preemption, where the site sends
# the job's signal then).
#
#   mkdir -p logs && sbatch launch/slurm_resnet152.sh                        # 4 nodes x 8 GPUs
#   sbatch --nodes=2 --gpus-per-node=4 launch/slurm_resnet152.sh --optim.lr=0.2
#   CONFIG=configs/imagenet/resnet50.toml CHECKPOINT_URI=s3://bucket/ckpt \
#     MLFLOW_TRACKING_URI=http://mlflow:5000 sbatch launch/slurm_resnet152.sh
#
# Submit from the repository root with the project's environment active (the job runs there; logs/
# must exist). Arguments after the script name, and TRAIN_ARGS, are config overrides
# (--section.key=value) for pipeline/train.py. sbatch options override the #SBATCH lines below.
#
# Environment (read at submission; sbatch exports the caller's environment to the job):
#   CONFIG           experiment file                               [configs/imagenet/resnet152.toml]
#   GPUS_PER_NODE    processes per node                            [the job's --gpus-per-node]
#                    required without GPUs: GPUS_PER_NODE=2 sbatch --gpus-per-node=0 ... trains on the CPUs
#   CHECKPOINT_URI   --checkpoint.uri: s3://bucket/prefix or a shared folder    [the config's]
#   MLFLOW_TRACKING_URI  --tracking.uri                            [the config's]
#   TRAIN_ARGS       more overrides, split on spaces
#   RUN_ID           checkpoint folder name, kept across requeues  [<job name>-<job id>]
#   LOG_DIR          per-node logs, on a filesystem all nodes share [logs/<job name>-<job id>]
#   RDZV_PORT        rendezvous port on the first node             [20000 + job id % 10000]
#   RDZV_TIMEOUT     seconds every node has to join                [600]
#   MAX_REQUEUES     stop requeueing after this many restarts      [50]
#   SITE_ENV         file sourced first: a site's NCCL/network settings (NCCL_SOCKET_IFNAME, ...)
#   SRUN_ARGS        extra srun options, e.g. "--container-image=... --container-workdir=/opt/resnet"
#   LAUNCH_PREFIX    command put before the node launcher, e.g. "apptainer exec --nv resnet.sif"
#   TORCHRUN         the torchrun executable                       [torchrun]
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
# --signal=USR1@300 (no "B:") signals every process of the job steps 300 s (SLURM may add up to 60 s)
# before the time limit: the training saves a checkpoint and exits 75. --requeue allows `scontrol
# requeue`, which puts the job back in the queue under the same job id; --open-mode=append keeps the
# logs of every restart. Only a stop that rank 0 recorded as committed (launch/slurm_lib.sh run_on_nodes)
# is requeued; a failure ends the job with the failing node's exit code and last error lines at the end
# of this job's output.
set -euo pipefail

: "${SLURM_JOB_ID:?submit this script with sbatch}"
cd "${SLURM_SUBMIT_DIR:-.}"
# shellcheck source=launch/slurm_lib.sh
source launch/slurm_lib.sh
site_defaults

config=${CONFIG:-configs/imagenet/resnet152.toml}
job_name=${SLURM_JOB_NAME:-resnet152}
run_id=${RUN_ID:-$job_name-$SLURM_JOB_ID}
log_dir=${LOG_DIR:-logs/$job_name-$SLURM_JOB_ID}
num_nodes=${SLURM_JOB_NUM_NODES:-1}
nproc=$(procs_per_node 8) || exit 2
rdzv_port=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}

# Every node's torchrun meets the first node's; ranks follow from the rendezvous (global, not local).
mapfile -t nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
rdzv_host=${nodes[0]}

overrides=(--run_id="$run_id")
add_overrides "$@"

say "job $SLURM_JOB_ID ($job_name) restart ${SLURM_RESTART_COUNT:-0}: ${#nodes[@]} nodes [${nodes[*]}]" \
  "x $nproc processes, rendezvous $rdzv_host:$rdzv_port, run id $run_id, config $config," \
  "node logs in $log_dir/"

# --max_restarts=0: a worker's exit 75 must end this allocation (to be requeued), not restart in place.
rc=0
run_on_nodes "$log_dir" "$num_nodes" launch/torchrun_node.sh \
  --nnodes="$num_nodes" --nproc_per_node="$nproc" \
  --rdzv_backend=c10d --rdzv_endpoint="$rdzv_host:$rdzv_port" --rdzv_id="$SLURM_JOB_ID" \
  --rdzv_conf=join_timeout="${RDZV_TIMEOUT:-600}" --max_restarts=0 \
  pipeline/train.py --config "$config" "${overrides[@]}" || rc=$?
finish "$rc" "run $run_id"
