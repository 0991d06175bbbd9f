#!/usr/bin/env bash
# Serving bench of principal plans after the orthonormal re-base; then 1M rows, 3 seeds: widths to 16 at CR 50 (principal and the _me control), widths to 32 at CR 10 (principal and _me).
set -e
cd "$(git rev-parse --show-toplevel)"
results/serving/bench_pca2.sh > runs/prof/bench_pca2.md 2>&1
M=runs/cmp1m
common=(--config configs/synthetic.yaml --data longtail=$M/data_longtail --data flat=$M/data_flat --grid 1,2 --candidates 2
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40)
.venv/bin/dnis compare "${common[@]}" --cr 50 --methods dnis_shared_half_pca,dnis_shared_half_me --seeds 3 --out $M/ab2
.venv/bin/dnis compare "${common[@]}" --cr 10 --methods dnis_shared_ladder_pca,dnis_shared_ladder_me --seeds 3 --out $M/ab2
