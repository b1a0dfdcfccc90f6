#!/usr/bin/env bash
# Train on GPUs.
#
# One host, all its GPUs (data parallel over a 1-D mesh of the local devices):
#   WORKDIR=runs/gc bash launch/multi_gpu.sh --config.train.batch_size=8
#
# Several hosts: run this on every host with the coordinator's address (host 0), the host
# count and this host's index:
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 WORKDIR=/shared/runs/gc \
#     bash launch/multi_gpu.sh --config.train.batch_size=16
#
# --dry-run (first argument) prints the command instead of running it. The run exits 75 when
# pre-empted (SIGTERM): start the same command again to resume.
set -euo pipefail
dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
: "${WORKDIR:?set WORKDIR}"
CONFIG="${CONFIG:-configs/gc.py}"
PYTHON="${PYTHON:-python}"
args=(--config="$CONFIG" --workdir="$WORKDIR")
if [ -n "${COORDINATOR:-}" ]; then
  args+=(--jax_distributed --coordinator_address="$COORDINATOR"
         --num_processes="${NUM_PROCESSES:?set NUM_PROCESSES}"
         --process_id="${PROCESS_ID:?set PROCESS_ID}")
fi
cmd=("$PYTHON" -m mr2ct_jax.main "${args[@]}" "$@")
if [ "$dry_run" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
