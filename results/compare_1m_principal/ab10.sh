#!/usr/bin/env bash
# 1M rows: dnis_shared_half_me (widths 1..16, tables' own columns, learned projection): the control for dnis_shared_half_pca.
set -e
cd "$(git rev-parse --show-toplevel)"
M=runs/cmp1m
common=(--config configs/synthetic.yaml --data longtail=$M/data_longtail --data flat=$M/data_flat
  --cr 10,20 --grid 1,2 --candidates 2
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40)
.venv/bin/dnis compare "${common[@]}" --methods dnis_shared_half_me --seeds 3 --out $M/ab2
