#!/usr/bin/env bash
# The paper's ablation: with and without the gradient-consistency loss, then paired t-tests.
#
#   DATA=/data/hip_tfds RUNS=runs/ablation bash launch/ablation.sh [extra --config.* overrides]
#
# Leave DATA empty to use the built-in phantom. Each run resumes if interrupted.
set -euo pipefail
RUNS="${RUNS:-runs/ablation}"
CONFIG="${CONFIG:-configs/gc.py}"
PYTHON="${PYTHON:-python}"
data_args=()
[ -n "${DATA:-}" ] && data_args=(--config.data.dir="$DATA")
for variant in gc nogc; do
  weight=0.3; [ "$variant" = nogc ] && weight=0
  "$PYTHON" -m mr2ct_jax.main --config="$CONFIG" "${data_args[@]}" \
    --config.loss.gc_weight="$weight" --workdir="$RUNS/$variant" "$@"
done
"$PYTHON" -m mr2ct_jax.evaluate --compare "$RUNS/nogc/eval" "$RUNS/gc/eval"
