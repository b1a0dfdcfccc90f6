#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every host runs the same command; JAX discovers the pod.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=gs://my-bucket/runs/gc DATA=gs://my-bucket/hip \
#     bash launch/tpu_pod.sh [--dry-run] [extra --config.* overrides]
#
# WORKDIR and DATA must be paths every worker sees: gs:// URLs (through gcsfs, which the
# install step adds when either is one; DATA written by `prepare --out=gs://...`) or a
# shared mount (Filestore, GCS Fuse). --dry-run prints the two gcloud commands.
#
# The global batch (config.train.batch_size) is split over all TPU cores, so it must be a
# multiple of the core count (e.g. --config.train.batch_size=32 on a v4-32). Each host reads
# only its own shard of the slice datasets (per-process split in the input pipeline).
set -euo pipefail
dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}" "${DATA:?set DATA}"
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url)}"
CONFIG="${CONFIG:-configs/gc.py}"
EXTRA_ARGS="$*"
# The TPU build of the JAX version the project is tested with (constraints.txt).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JAX_VERSION="$(sed -n 's/^jax==//p' "$here/constraints.txt")"
GCLOUD="${GCLOUD:-gcloud}"
package=.
case "$WORKDIR $DATA" in *gs://*) package='.[gcs]' ;; esac
run() {
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# Step 1: same checkout and environment on every host.
run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command "
  set -e
  [ -d mr2ct_jax ] || git clone '$REPO_URL' mr2ct_jax
  cd mr2ct_jax && git pull --ff-only
  python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '$package' 'jax[tpu]==$JAX_VERSION'
"

# Step 2: launch on all hosts at once; jax.distributed.initialize() finds the pod topology.
run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command "
  cd mr2ct_jax && .venv/bin/python -m mr2ct_jax.main --jax_distributed \
    --config=$CONFIG --config.data.dir=$DATA --workdir=$WORKDIR $EXTRA_ARGS
"
