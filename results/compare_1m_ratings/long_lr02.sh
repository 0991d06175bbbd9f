#!/usr/bin/env bash
# long.sh's protocol (CR 10, 8 epochs, no early stopping) at table learning rate 0.2
# instead of 0.05, the unpruned model, uniform width K' = 3 and the shipped method with a
# 2-epoch search (the better split at 0.05), into runs/cmp1m/out_ratings_long_lr02: does
# a higher rate close the gap to the unpruned model, and for whom? (long_lr02.md / .json)
# SEEDS=3: seeds 1 and 2 as well (seed 0 is reused). PER_FIELD=1: the shipped method with
# per-field blocking (blocking.per_field), into runs/cmp1m/out_ratings_long_lr02_per_field.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
methods=grid,dnis_shared_half_pca,full out=runs/cmp1m/out_ratings_long_lr02 extra=()
if [ "${PER_FIELD:-0}" = 1 ]; then
  methods=dnis_shared_half_pca out=runs/cmp1m/out_ratings_long_lr02_per_field
  extra=(--set blocking.per_field=true)
fi
.venv/bin/dnis compare --config configs/synthetic.yaml --data ratings=runs/cmp1m/data_ratings \
  --cr 10 --seeds "${SEEDS:-1}" --epochs 8 --search-epochs 2 --grid 3 --min-row-lookups 0 \
  --methods "$methods" --out "$out" \
  --set train.sparse_lr=0.2 --set train.patience=100 --set train.eval_every=400 \
  --set train.checkpoint_every=400 --set train.log_every=200 --set nis.warmup_steps=40 "${extra[@]}"
