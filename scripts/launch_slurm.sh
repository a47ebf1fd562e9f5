#!/usr/bin/env bash
# Submits train.py (and, with --eval, eval.py) as one Slurm batch job on GPU
# nodes: one task per GPU (default) or one task per node; jax.distributed
# detects the job from Slurm's environment (SLURM_NTASKS, SLURM_PROCID, ...).
#
#   scripts/launch_slurm.sh --nodes=4 --gpus_per_node=8 --partition=gpu --time=24:00:00 \
#       --workdir=/shared/runs/gshard --data_dir=/shared/tfds \
#       -- --config configs/gshard.py:1b --config.mesh='(1,8,1)'
#
# Everything after `--` goes to train.py (and eval.py) as it is. Nodes are
# the mesh's domains: it adds --config.dcn_mesh='(NODES,1,1)', so
# config.mesh is the shape inside one node (experts on NVLink) and data goes
# across nodes (give --config.dcn_mesh yourself for another split). The
# script is written to WORKDIR/launch.sbatch and submitted with sbatch.
# Options (all --name=value):
#   --workdir=DIR          the run, on a filesystem every node shares (required)
#   --data_dir=DIR         TFDS data_dir (shared; default: the config's)
#   --nodes=N              nodes (default 1)
#   --gpus_per_node=G      GPUs per node (default 8)
#   --per=gpu|node         gpu (default): N*G tasks, task i drives GPU SLURM_LOCALID;
#                          node: N tasks, each drives all G GPUs of its node
#   --partition=P --account=A --time=T --cpus_per_task=C --job_name=NAME
#   --sbatch='--opt=val'   any other #SBATCH line (repeatable)
#   --requeue              let Slurm requeue the job after preemption
#   --repo_dir=DIR         this repository as the nodes see it (default: here)
#   --python=PY            interpreter (default: python)
#   --setup='CMD'          shell run first (e.g. 'source .venv/bin/activate')
#   --eval                 then run eval.py with the same arguments
#   --dry_run              print the script and the sbatch command, submit
#                          nothing (also DRY_RUN=1)
# Slurm sends SIGTERM 120 s before the time limit (--signal=TERM@120):
# train.py saves a checkpoint and exits 0; rerunning (or --requeue) resumes.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/launch_lib.sh"   # usage, die, q, join_quoted

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR='' DATA_DIR='' NODES=1 GPUS=8 PER=gpu PARTITION='' ACCOUNT='' TIME=''
CPUS='' JOB_NAME='moe' REQUEUE=0 REPO_DIR="$REPO" PYTHON='python' SETUP=''
EVAL=0 DRY_RUN="${DRY_RUN:-0}" EXTRA=()
while (($#)); do
  case "$1" in
    --workdir=*) WORKDIR="${1#*=}" ;;
    --data_dir=*) DATA_DIR="${1#*=}" ;;
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPUS="${1#*=}" ;;
    --per=*) PER="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --cpus_per_task=*) CPUS="${1#*=}" ;;
    --job_name=*) JOB_NAME="${1#*=}" ;;
    --sbatch=*) EXTRA+=("${1#*=}") ;;
    --requeue) REQUEUE=1 ;;
    --repo_dir=*) REPO_DIR="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --setup=*) SETUP="${1#*=}" ;;
    --eval) EVAL=1 ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (options are --name=value; train.py arguments go after --)" ;;
  esac
  shift
done
ARGS=("$@")

[[ -n "$WORKDIR" ]] || die '--workdir=DIR is required (on a filesystem all nodes share)'
[[ "$WORKDIR" != *://* ]] || die "--workdir=$WORKDIR: give a path on a filesystem all nodes share (Slurm writes the job script and its log there), not a URL"
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes=$NODES must be a positive integer"
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node=$GPUS must be a positive integer"
[[ "$PER" == gpu || "$PER" == node ]] || die "--per=$PER: choose gpu or node"
for a in "${ARGS[@]}"; do
  case "$a" in --workdir*|--config.data.data_dir*) die "give $a through --workdir=/--data_dir= of this script" ;; esac
done
((${#ARGS[@]})) || die 'give train.py arguments after --, e.g. -- --config configs/gshard.py:1b'
[[ "$JOB_NAME" =~ ^[A-Za-z0-9_.,=+-]+$ ]] || die "--job_name=$JOB_NAME: use letters, digits and _.,=+-"

RUN_ARGS=("${ARGS[@]}")
if ! printf '%s\n' "${ARGS[@]}" | grep -q '^--config\.dcn_mesh'; then
  RUN_ARGS+=("--config.dcn_mesh=($NODES,1,1)")
fi
RUN_ARGS+=("--workdir=$WORKDIR")
[[ -n "$DATA_DIR" ]] && RUN_ARGS+=("--config.data.data_dir=$DATA_DIR")
if [[ "$PER" == gpu ]]; then TASKS=$GPUS; else TASKS=1; fi

SCRIPT_PATH="$WORKDIR/launch.sbatch"
SCRIPT="#!/bin/bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$TASKS
#SBATCH --gpus-per-node=$GPUS"
[[ -n "$CPUS" ]] && SCRIPT+=$'\n'"#SBATCH --cpus-per-task=$CPUS"
[[ -n "$TIME" ]] && SCRIPT+=$'\n'"#SBATCH --time=$TIME"
[[ -n "$PARTITION" ]] && SCRIPT+=$'\n'"#SBATCH --partition=$PARTITION"
[[ -n "$ACCOUNT" ]] && SCRIPT+=$'\n'"#SBATCH --account=$ACCOUNT"
SCRIPT+=$'\n'"#SBATCH --output=$WORKDIR/slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=TERM@120"
((REQUEUE)) && SCRIPT+=$'\n'"#SBATCH --requeue"
for line in "${EXTRA[@]+"${EXTRA[@]}"}"; do SCRIPT+=$'\n'"#SBATCH $line"; done
SCRIPT+=$'\n'"set -eo pipefail
cd $(q "$REPO_DIR")"
[[ -n "$SETUP" ]] && SCRIPT+=$'\n'"$SETUP"
if [[ "$PER" == gpu ]]; then
  SCRIPT+=$'\n'"# One process per GPU: jax.distributed gives process SLURM_LOCALID the GPU
# of that index, so every task must see all of its node's GPUs (no
# --gpus-per-task or --gpu-bind=single here)."
else
  SCRIPT+=$'\n'"# One process per node driving all of its GPUs (jax.distributed would
# otherwise give each process only GPU SLURM_LOCALID=0).
export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS - 1)))"
fi
SCRIPT+=$'\n'"srun --kill-on-bad-exit=1 $(join_quoted "$PYTHON" train.py "${RUN_ARGS[@]}")"
((EVAL)) && SCRIPT+=$'\n'"srun --kill-on-bad-exit=1 $(join_quoted "$PYTHON" eval.py "${RUN_ARGS[@]}")"

if ((DRY_RUN)); then
  echo "# would write $SCRIPT_PATH:"
  printf '%s\n' "$SCRIPT"
  echo "# and run:"
  join_quoted sbatch "$SCRIPT_PATH"
  echo
  exit 0
fi
mkdir -p "$WORKDIR"
printf '%s\n' "$SCRIPT" > "$SCRIPT_PATH"
exec sbatch "$SCRIPT_PATH"
