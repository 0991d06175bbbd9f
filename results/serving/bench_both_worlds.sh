#!/usr/bin/env bash
# The shipped plan (widths 1..16 on principal columns, shared rows below 30 lookups, 100 on
# the flat world) served fp32 and int8 at batch 1 / 64 / 4096 on both 1M worlds' seed-0
# searches, quiet machine, one thread (README "Serving and retraining them"). RUNS=n: n runs.
cd "$(git rev-parse --show-toplevel)"
for run in $(seq "${RUNS:-1}"); do for world in longtail flat; do
  lookups=30; [ $world = flat ] && lookups=100
  echo "## $world, run $run"
  .venv/bin/python benchmarks/inference.py --run-dir runs/cmp1m/out/$world/deepfm/seed0/search \
      --raw runs/cmp1m/raw_$world.txt --width-step 1 --widths 1,2,4,8,16 --basis principal \
      --min-row-lookups $lookups --rounds 40 2>&1 | grep -v "Warn\|warn\|is_fx_tracing"
done; done
