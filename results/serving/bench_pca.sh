#!/usr/bin/env bash
# Serving and retraining cost of principal-column plans (learned projection, Gram term folded per block)
# against the same widths on the tables' own columns (selection), pruned from the 1M long-tail seed-0 search, c = 30.
cd "$(git rev-parse --show-toplevel)"
run=runs/cmp1m/out/longtail/deepfm/seed0/search
for b in principal columns; do
  echo "## serving widths 1..16, basis $b"
  .venv/bin/python benchmarks/inference.py --run-dir $run --raw runs/cmp1m/raw_longtail.txt --fp32-only --width-step 1 \
      --widths 1,2,4,8,16 --basis $b --rounds 40 2>&1 | grep "^|\|thread"
done
echo "## serving widths 1..32, basis principal"
.venv/bin/python benchmarks/inference.py --run-dir $run --raw runs/cmp1m/raw_longtail.txt --fp32-only --width-step 1 \
    --widths 1,2,4,8,16,32 --basis principal --rounds 40 2>&1 | grep "^|\|thread"
for w in 1,2,4,8,16 1,2,4,8,16,32; do
  echo "## retrain step widths $w, basis principal"
  .venv/bin/python benchmarks/retrain_step.py --run-dir $run --allocation value --min-row-lookups 30 \
      --widths $w --basis principal --rounds 6 2>&1 | grep -v "Warn\|warn" | tail -8
done
