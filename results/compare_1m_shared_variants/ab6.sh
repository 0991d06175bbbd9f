#!/usr/bin/env bash
# 1M rows: dnis_shared_narrow (widths 1..8 at K=32), then dnis_shared_half (1..16) on copies of the 1M compare's searches, 3 seeds,
# next to dnis_shared_ladder (widths 1..32) already in runs/cmp1m/ab2.
set -e
cd /work/main
common=(--config configs/synthetic.yaml --data longtail=runs/cmp1m/data_longtail --data flat=runs/cmp1m/data_flat
  --cr 10,20 --grid 1,2 --candidates 2
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40)
.venv/bin/dnis compare "${common[@]}" --methods dnis_shared_half --seeds 3 --out runs/cmp1m/ab2
