#!/usr/bin/env bash
# The train-step sweep of the GPU benchmark: batch x compute dtype x fused pairs at one size,
# each a `bench train` JSON report (with the PyTorch reference timed in the same run when it
# is installed), then one markdown table with the speedups and the MFU.
#
#   OUT=bench_gpu bash launch/gpu_bench.sh                     # 256^2, batch 1 4 16, both dtypes, fused or not
#   SIZE=128 BATCHES="1 4" DTYPES=bfloat16 FUSE=True STEPS=30 OUT=b bash launch/gpu_bench.sh
#   bash launch/gpu_bench.sh --dry-run                         # print the commands only
#
# Extra arguments go to every `bench train` (e.g. --nopytorch, --peak_tflops=...).
set -euo pipefail
dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
OUT="${OUT:-bench_gpu}"
SIZE="${SIZE:-256}"
BATCHES="${BATCHES:-1 4 16}"
DTYPES="${DTYPES:-float32 bfloat16}"
FUSE="${FUSE:-False True}"
STEPS="${STEPS:-50}"
PYTHON="${PYTHON:-python}"
reports=()
run() {
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
[ "$dry_run" = 1 ] || mkdir -p "$OUT"
for batch in $BATCHES; do
  for dtype in $DTYPES; do
    for fuse in $FUSE; do
      report="$OUT/train_${SIZE}_b${batch}_${dtype}_fuse${fuse}.json"
      reports+=("$report")
      run "$PYTHON" -m mr2ct_jax.bench train --size="$SIZE" --gc --batch="$batch" \
        --dtype="$dtype" --config.train.fuse_pairs="$fuse" --steps="$STEPS" \
        --output="$report" "$@"
    done
  done
done
run "$PYTHON" -m mr2ct_jax.bench summary --output="$OUT/summary.md" "${reports[@]}"
