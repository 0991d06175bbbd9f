#!/usr/bin/env bash
# long.sh's protocol (CR 10, 8 epochs, no early stopping) at table learning rate 0.2
# instead of 0.05, one seed, the unpruned model, uniform width K' = 3 and the shipped
# method with a 2-epoch search (the better split at 0.05), into
# runs/cmp1m/out_ratings_long_lr02: does a higher rate close the gap to the unpruned
# model, and for whom? (long_lr02.md / .json)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
.venv/bin/dnis compare --config configs/synthetic.yaml --data ratings=runs/cmp1m/data_ratings \
  --cr 10 --seeds 1 --epochs 8 --search-epochs 2 --grid 3 --min-row-lookups 0 \
  --methods grid,dnis_shared_half_pca,full --out runs/cmp1m/out_ratings_long_lr02 \
  --set train.sparse_lr=0.2 --set train.patience=100 --set train.eval_every=400 \
  --set train.checkpoint_every=400 --set train.log_every=200 --set nis.warmup_steps=40
