#!/usr/bin/env bash
# Retraining step of principal plans (learned projection) next to the same widths on the tables' own columns
# (selection), 1M long-tail seed-0 search, c = 30, quiet machine.
cd "$(git rev-parse --show-toplevel)"
run=runs/cmp1m/out/longtail/deepfm/seed0/search
for args in "1,2,4,8,16 --basis principal" "1,2,4,8,16 --basis columns" "1,2,4,8,16,32 --basis principal"; do
  echo "## retrain step widths $args"
  .venv/bin/python benchmarks/retrain_step.py --run-dir $run --allocation value --min-row-lookups 30 \
      --widths $args --rounds 6 2>&1 | grep -v "Warn\|warn" | tail -8
done
