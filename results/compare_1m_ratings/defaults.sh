#!/usr/bin/env bash
# The ratings world at the compare's default protocol (2 epochs, table learning rate 0.01),
# 3 seeds: no model learns the user x item interaction (defaults.md). The
# dnis_shared_half_pca cells of this run were refused by the knapsack before its fix
# (commit cbebcc7) and are not in defaults.md (tables made with --tables-only and the
# methods below).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
.venv/bin/dnis compare --config configs/synthetic.yaml --data ratings=runs/cmp1m/data_ratings \
  --cr 10,20 --seeds 3 --grid 1,2 --candidates 2 --methods full,grid,qr,mde,random,int8 --out runs/cmp1m/out_ratings \
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40
