#!/usr/bin/env bash
# Retraining folded onto the pooled columns (pipeline.models.column_fold) and the stacked, functional serving
# fold: the 1M long-tail seed-0 search's value plans (c = 30), principal and own columns, widths to 16 and 32.
# Output: results/serving/fold_1m_longtail.md
cd "$(git rev-parse --show-toplevel)"
run=runs/cmp1m/out/longtail/deepfm/seed0/search
for args in "1,2,4,8,16 principal" "1,2,4,8,16 columns" "1,2,4,8,16,32 principal" "1,2,4,8,16,32 columns"; do
  set -- $args
  echo "## retrain step widths $1, basis $2"
  .venv/bin/python benchmarks/retrain_step.py --run-dir $run --allocation value --min-row-lookups 30 \
      --widths $1 --basis $2 --rounds 6 2>&1 | grep -v "Warn\|warn" | tail -8
done
for args in "1,2,4,8,16 principal" "1,2,4,8,16 columns" "1,2,4,8,16,32 principal"; do
  set -- $args
  echo "## serving widths $1, basis $2"
  .venv/bin/python benchmarks/inference.py --run-dir $run --raw runs/cmp1m/raw_longtail.txt --fp32-only --width-step 1 \
      --widths $1 --basis $2 --rounds 40 2>&1 | grep "^|\|thread"
done
