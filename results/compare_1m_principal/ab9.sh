#!/usr/bin/env bash
# 1M rows: dnis_shared_half_pca (widths 1..16 on principal columns, learned projection), on copies of the 1M compare's searches, 3 seeds.
set -e
cd "$(git rev-parse --show-toplevel)"
M=runs/cmp1m
common=(--config configs/synthetic.yaml --data longtail=$M/data_longtail --data flat=$M/data_flat
  --cr 10,20 --grid 1,2 --candidates 2
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40)
.venv/bin/dnis compare "${common[@]}" --methods dnis_shared_half_pca --seeds 3 --out $M/ab2
# ab10.sh (run after it, as both prune into the same search directories): the same with --methods dnis_shared_half_me.
