#!/usr/bin/env bash
# The paper's ablations (GC on/off x training-set size, signed GC, MR baseline, real-CT upper
# bound) as one call of the study driver; the report is WORKDIR/report/report.md.
#
#   PRESET=cpu_small RUNS=runs/paper bash launch/ablation.sh                  # the phantom
#   PRESET=paper DATA=/data/hip_tfds RUNS=runs/paper bash launch/ablation.sh --cells=gc_large
#
# Extra arguments go to `python -m mr2ct_jax.experiments.paper`. Reruns resume.
set -euo pipefail
RUNS="${RUNS:-runs/paper}"
PRESET="${PRESET:-cpu_small}"
PYTHON="${PYTHON:-python}"
data_args=()
[ -n "${DATA:-}" ] && data_args=(--data="$DATA")
exec "$PYTHON" -m mr2ct_jax.experiments.paper --preset="$PRESET" "${data_args[@]}" \
  --workdir="$RUNS" "$@"
