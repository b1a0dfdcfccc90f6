#!/usr/bin/env bash
# Train on a SLURM cluster: one process per GPU on every node, started by srun.
#
#   WORKDIR=/shared/runs/gc sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 \
#     launch/slurm.sh --config.train.batch_size=16
#   WORKDIR=/shared/runs/gc bash launch/slurm.sh --dry-run [overrides]   # print the command
#
# jax.distributed.initialize() reads the coordinator (the first node), the process count and
# each process's index from SLURM's environment (SLURM_JOB_NODELIST, SLURM_NTASKS,
# SLURM_PROCID), and each process uses the GPU SLURM gave it. WORKDIR (and config.data.dir)
# must be on a filesystem every node sees. A pre-empted job exits 75; with --requeue SLURM
# starts it again and it resumes from the latest checkpoint.
#SBATCH --job-name=mr2ct_jax
#SBATCH --requeue
#SBATCH --signal=TERM@120
set -euo pipefail
dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
: "${WORKDIR:?set WORKDIR}"
CONFIG="${CONFIG:-configs/gc.py}"
PYTHON="${PYTHON:-python}"
SRUN="${SRUN:-srun}"
cmd=("$SRUN" --kill-on-bad-exit=1 "$PYTHON" -m mr2ct_jax.main --jax_distributed
     --config="$CONFIG" --workdir="$WORKDIR" "$@")
if [ "$dry_run" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
