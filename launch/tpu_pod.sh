#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every host runs the same command; JAX discovers the pod.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=gs://bucket/runs/gc DATA=gs://bucket/hip_tfds \
#     bash launch/tpu_pod.sh [extra --config.* overrides]
#
# The global batch (config.train.batch_size) is split over all TPU cores, so it must be a
# multiple of the core count (e.g. --config.train.batch_size=32 on a v4-32). Each host reads
# only its own shard of the slice datasets (per-process split in the input pipeline).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}" "${DATA:?set DATA}"
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url)}"
CONFIG="${CONFIG:-configs/gc.py}"
EXTRA_ARGS="$*"

# Step 1: same checkout and environment on every host.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command "
  set -e
  [ -d mr2ct_jax ] || git clone '$REPO_URL' mr2ct_jax
  cd mr2ct_jax && git pull --ff-only
  python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e . 'jax[tpu]'
"

# Step 2: launch on all hosts at once; jax.distributed.initialize() finds the pod topology.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command "
  cd mr2ct_jax && .venv/bin/python -m mr2ct_jax.main --jax_distributed \
    --config=$CONFIG --config.data.dir=$DATA --workdir=$WORKDIR $EXTRA_ARGS
"
