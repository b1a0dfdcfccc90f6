#!/usr/bin/env bash
# The paper's study (python -m mr2ct_jax.experiments.paper) with every cell as its own job.
#
# GPUs of one host, one cell per GPU (CUDA_VISIBLE_DEVICES), then real_ct and the report:
#   DATA=/data/hip_tfds WORKDIR=runs/paper bash launch/paper_sweep.sh [--dry-run]
# Cloud TPU: one single-host slice per job (e.g. v4-8: the driver is one process). TPU_NAMES:
# space-separated slice names, one per job of the first wave (6 cells; with SEEDS=N,
# 5 x N + 1 jobs); WORKDIR and DATA on a filesystem every slice mounts:
#   TPU_NAMES="s0 s1 s2 s3 s4 s5" ZONE=us-central2-b DATA=/mnt/hip WORKDIR=/mnt/runs/paper \
#     bash launch/paper_sweep.sh [--dry-run]
#
# PRESET (default paper), SEEDS (training seeds per synthesis cell, default 1: with more, each
# seed of a synthesis cell is its own job, <cell>@<k>), GPUS (default: the GPUs nvidia-smi
# lists) and PYTHON may be set.
# Cells already finished are skipped by the driver, interrupted ones resume: rerun the same
# command. Cells run side by side into one WORKDIR (each locks its own cell); real_ct needs
# gc_large (its seed 0) and runs after the first wave, followed by the report. --dry-run
# prints the commands.
set -euo pipefail
dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
: "${WORKDIR:?set WORKDIR}" "${DATA:?set DATA (a prepared dataset)}"
# The cells lock themselves with flock(): the workdir must be a shared POSIX filesystem (NFS,
# Filestore, Lustre), not a bucket; DATA may be a gs:// URL.
[[ "$WORKDIR" != *://* ]] || { echo "WORKDIR=$WORKDIR: need a shared POSIX filesystem (cell locks use flock), not a URL" >&2; exit 2; }
PRESET="${PRESET:-paper}"
SEEDS="${SEEDS:-1}"
[[ "$SEEDS" =~ ^[1-9][0-9]*$ ]] || { echo "SEEDS=$SEEDS: need a whole number >= 1" >&2; exit 2; }
PYTHON="${PYTHON:-python}"
SYNTHESIS=(gc_small nogc_small gc_large nogc_large gc_signed_large)
FIRST=()
for cell in "${SYNTHESIS[@]}"; do
  if [ "$SEEDS" = 1 ]; then FIRST+=("$cell")
  else for ((k = 0; k < SEEDS; k++)); do FIRST+=("$cell@$k"); done; fi
done
FIRST+=(mr_baseline)
driver=(-m mr2ct_jax.experiments.paper --preset="$PRESET" --data="$DATA" --workdir="$WORKDIR")
[ "$SEEDS" = 1 ] || driver+=(--seeds="$SEEDS")
show() { printf '%q ' "$@"; echo; }

if [ -n "${TPU_NAMES:-}" ]; then
  : "${ZONE:?set ZONE}"
  read -r -a slices <<< "$TPU_NAMES"
  [ "${#slices[@]}" -ge "${#FIRST[@]}" ] || { echo "TPU_NAMES: need ${#FIRST[@]} slices (one per job)" >&2; exit 2; }
  GCLOUD="${GCLOUD:-gcloud}"
  job() {  # slice, cell
    local cmd=("$GCLOUD" compute tpus tpu-vm ssh "$1" --zone="$ZONE" --worker=all --command
               "cd mr2ct_jax && .venv/bin/python ${driver[*]} --cells=$2")
    if [ "$dry_run" = 1 ]; then show "${cmd[@]}"; else "${cmd[@]}" & fi
  }
  for i in "${!FIRST[@]}"; do job "${slices[$i]}" "${FIRST[$i]}"; done
  [ "$dry_run" = 1 ] || wait
  job "${slices[0]}" real_ct
  [ "$dry_run" = 1 ] || wait
  exit 0
fi

if [ -n "${GPUS:-}" ]; then read -r -a gpus <<< "$GPUS"
elif [ "$dry_run" = 1 ]; then gpus=(0 1 2 3 4 5)
else mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader); fi
[ "${#gpus[@]}" -gt 0 ] || { echo "no GPU found; set GPUS" >&2; exit 2; }
# Round-robin: cell i on GPU i mod count; cells sharing a GPU run one after another.
pids=()
for g in "${!gpus[@]}"; do
  cells=()
  for i in "${!FIRST[@]}"; do
    [ $((i % ${#gpus[@]})) = "$g" ] && cells+=("${FIRST[$i]}")
  done
  [ "${#cells[@]}" -gt 0 ] || continue
  list="$(IFS=,; echo "${cells[*]}")"
  cmd=(env CUDA_VISIBLE_DEVICES="${gpus[$g]}" "$PYTHON" "${driver[@]}" --cells="$list")
  if [ "$dry_run" = 1 ]; then show "${cmd[@]}"; else "${cmd[@]}" & pids+=($!); fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" = 0 ] || { echo "a cell failed; rerun to resume" >&2; exit 1; }
cmd=(env CUDA_VISIBLE_DEVICES="${gpus[0]}" "$PYTHON" "${driver[@]}" --cells=real_ct)
if [ "$dry_run" = 1 ]; then show "${cmd[@]}"; else "${cmd[@]}"; fi
