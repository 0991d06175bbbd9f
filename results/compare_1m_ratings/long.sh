#!/usr/bin/env bash
# The ratings world with a longer protocol, CR 10, 2 seeds, into runs/cmp1m/out_ratings_long:
# 8 epochs for every method (the shipped method: a 4-epoch search, then 4 epochs of
# retraining), table learning rate 0.05, and no early stopping (train.patience 100): in
# run.sh's 4 epochs the unpruned model learns the user x item interaction only in its
# 3rd and 4th epochs and the compressed models stop on the plateau before it (their
# validation logloss stalls while the AUC creeps up). This asks whether the compressed
# models reach the interaction when given the time, and whether a plan cut from a
# search that has learned it keeps it.
# PER_FIELD=1: the same with per-field blocking in the search (each field its own 6
# frequency blocks, blocking.per_field), the shipped method only, into
# runs/cmp1m/out_ratings_long_per_field. SEARCH_EPOCHS=2: the shipped method with a
# 2-epoch search and 6 epochs of retraining, into runs/cmp1m/out_ratings_long_search2.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
[ -d runs/cmp1m/data_ratings ] || bash results/compare_1m_ratings/run.sh  # makes the data first
methods=full,grid,qr,mde,dnis_shared_half_pca out=runs/cmp1m/out_ratings_long extra=()
if [ "${PER_FIELD:-0}" = 1 ]; then
  methods=dnis_shared_half_pca out=runs/cmp1m/out_ratings_long_per_field
  extra=(--set blocking.per_field=true)
fi
if [ "${SEARCH_EPOCHS:-4}" != 4 ]; then
  methods=dnis_shared_half_pca out=runs/cmp1m/out_ratings_long_search$SEARCH_EPOCHS
fi
.venv/bin/dnis compare --config configs/synthetic.yaml --data ratings=runs/cmp1m/data_ratings \
  --cr 10 --seeds 2 --epochs 8 --search-epochs "${SEARCH_EPOCHS:-4}" --grid 1,2 --min-row-lookups 0 \
  --methods "$methods" --out "$out" \
  --set train.sparse_lr=0.05 --set train.patience=100 --set train.eval_every=400 \
  --set train.checkpoint_every=400 --set train.log_every=200 --set nis.warmup_steps=40 "${extra[@]}"
