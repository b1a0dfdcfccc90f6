#!/usr/bin/env bash
# Train on GPUs.
#
# One host, all its GPUs (data parallel over a 1-D mesh of the local devices):
#   WORKDIR=runs/gc bash launch/multi_gpu.sh --config.train.batch_size=8
#
# Several hosts: run this on every host with the coordinator's address, the host count and
# this host's index; jax.distributed.initialize() reads them from the environment.
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 WORKDIR=/shared/runs/gc \
#     bash launch/multi_gpu.sh --config.train.batch_size=16
set -euo pipefail
: "${WORKDIR:?set WORKDIR}"
CONFIG="${CONFIG:-configs/gc.py}"
PYTHON="${PYTHON:-python}"
args=(--config="$CONFIG" --workdir="$WORKDIR")
if [ -n "${COORDINATOR:-}" ]; then
  export JAX_COORDINATOR_ADDRESS="$COORDINATOR"
  export JAX_NUM_PROCESSES="${NUM_PROCESSES:?set NUM_PROCESSES}"
  export JAX_PROCESS_ID="${PROCESS_ID:?set PROCESS_ID}"
  args+=(--jax_distributed)
fi
exec "$PYTHON" -m mr2ct_jax.main "${args[@]}" "$@"
