#!/usr/bin/env bash
# Serving principal-column plans after the orthonormal re-base (learned projection served with a norm FM term),
# 1M long-tail seed-0 search, c = 30; widths to 16 and to 32.
cd "$(git rev-parse --show-toplevel)"
run=runs/cmp1m/out/longtail/deepfm/seed0/search
for w in 1,2,4,8,16 1,2,4,8,16,32; do
  echo "## serving widths $w, basis principal (orthonormal re-base)"
  .venv/bin/python benchmarks/inference.py --run-dir $run --raw runs/cmp1m/raw_longtail.txt --fp32-only --width-step 1 \
      --widths $w --basis principal --rounds 40 2>&1 | grep "^|\|thread"
done
