#!/usr/bin/env bash
# Runs train.py (and, with --eval, eval.py) on EVERY worker of a TPU VM pod
# slice: one `gcloud compute tpus tpu-vm ssh --worker=all` with the same
# command for all hosts; jax.distributed detects the slice by itself.
#
#   scripts/launch_tpu.sh --tpu=my-v5p-32 --zone=us-east5-a \
#       --workdir=gs://BUCKET/runs/switch1b --data_dir=gs://BUCKET/tfds \
#       -- --config configs/switch.py:1b --config.data.name=c4/en
#
#   scripts/launch_tpu.sh --tpu=my-qr --num_slices=2 --zone=us-east5-a \
#       --workdir=gs://BUCKET/runs/switch1b --data_dir=gs://BUCKET/tfds \
#       -- --config configs/switch.py:1b --config.data.name=c4/en --config.mesh='(1,-1,1)'
#
# Everything after `--` goes to train.py (and eval.py) as it is. With
# --num_slices=N > 1 (Multislice: TPU is then a queued resource of N slices),
# it runs on every worker of every slice and adds --config.dcn_mesh='(N,1,1)':
# config.mesh is the shape inside one slice (experts on its ICI), data goes
# across slices over DCN (give --config.dcn_mesh yourself for another split).
# Options (all --name=value):
#   --tpu=NAME --zone=ZONE      the slice, or the queued resource (required)
#   --num_slices=N              slices of a Multislice queued resource (default 1)
#   --project=PROJECT           gcloud project (default: gcloud's)
#   --workdir=gs://...          the run (required; gs:// so every worker and
#                               every restart sees the same checkpoints)
#   --data_dir=gs://...         TFDS data_dir (required; gs:// so process 0's
#                               prepared data is every worker's)
#   --repo_dir=DIR              this repository on the workers (default: moe,
#                               i.e. ~/moe; copy it there first, e.g. with
#                               `gcloud compute tpus tpu-vm scp --worker=all`)
#   --python=PY                 interpreter on the workers (default: python3)
#   --setup='CMD'               shell run on each worker first (e.g.
#                               'source ~/venv/bin/activate && pip install -e ".[gcs]"';
#                               gcsfs reaches the gs:// workdir and data_dir)
#   --eval                      then run eval.py with the same arguments
#   --dry_run                   print exactly the command, run nothing (also DRY_RUN=1)
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/launch_lib.sh"   # usage, die, q, join_quoted

TPU='' ZONE='' PROJECT='' WORKDIR='' DATA_DIR='' REPO_DIR='moe' PYTHON='python3' SLICES=1
SETUP='' EVAL=0 DRY_RUN="${DRY_RUN:-0}"
while (($#)); do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --num_slices=*) SLICES="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --data_dir=*) DATA_DIR="${1#*=}" ;;
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

[[ -n "$TPU" ]] || die '--tpu=NAME is required'
[[ -n "$ZONE" ]] || die '--zone=ZONE is required'
[[ "$WORKDIR" == gs://* ]] || die "--workdir must be gs://... (got '${WORKDIR}'): every worker writes the same run"
[[ "$DATA_DIR" == gs://* ]] || die "--data_dir must be gs://... (got '${DATA_DIR}'): every worker reads the same TFDS data"
for a in "${ARGS[@]}"; do
  case "$a" in --workdir*|--config.data.data_dir*) die "give $a through --workdir=/--data_dir= of this script" ;; esac
done
((${#ARGS[@]})) || die 'give train.py arguments after --, e.g. -- --config configs/switch.py:1b'

[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num_slices=$SLICES must be a positive integer"

RUN_ARGS=("${ARGS[@]}")
if ((SLICES > 1)) && ! printf '%s\n' "${ARGS[@]}" | grep -q '^--config\.dcn_mesh'; then
  RUN_ARGS+=("--config.dcn_mesh=($SLICES,1,1)")
fi
RUN_ARGS+=("--workdir=$WORKDIR" "--config.data.data_dir=$DATA_DIR")
REMOTE="cd $(q "$REPO_DIR")"
[[ -n "$SETUP" ]] && REMOTE+=" && $SETUP"
REMOTE+=" && $(join_quoted "$PYTHON" train.py "${RUN_ARGS[@]}")"
((EVAL)) && REMOTE+=" && $(join_quoted "$PYTHON" eval.py "${RUN_ARGS[@]}")"

if ((SLICES > 1)); then
  CMD=(gcloud compute tpus queued-resources ssh "$TPU" "--zone=$ZONE")
else
  CMD=(gcloud compute tpus tpu-vm ssh "$TPU" "--zone=$ZONE")
fi
[[ -n "$PROJECT" ]] && CMD+=("--project=$PROJECT")
((SLICES > 1)) && CMD+=(--node=all)
CMD+=(--worker=all "--command=$REMOTE")

if ((DRY_RUN)); then
  join_quoted "${CMD[@]}"
  echo
  exit 0
fi
exec "${CMD[@]}"
