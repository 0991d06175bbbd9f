#!/usr/bin/env bash
# The ratings world (dnis-synth --world ratings: MovieLens-1M-shaped users and items,
# every other field empty), 1M rows, 2 seeds, CR 10 and 20, the shipped method against
# the uniform grid, QR, MDE and the unpruned model, into runs/cmp1m/out_ratings_lr05.
# The table optimizer's learning rate is 0.05 (default 0.01) and training 4 epochs
# (default 2, search 2): at the defaults no model learns the user x item interaction
# (full model 0.610, the first-order weights alone score 0.60; README.md).
# CR 4 (where uniform width 8, the planted width, fits): CRS=4 GRID=8 run.sh.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
[ -f runs/cmp1m/raw_ratings.txt ] || .venv/bin/dnis-synth --rows 1000000 --world ratings \
  --out runs/cmp1m/raw_ratings.txt --truth runs/cmp1m/truth_ratings.json
[ -d runs/cmp1m/data_ratings ] || .venv/bin/dnis-preprocess --output runs/cmp1m/data_ratings \
  --dataset synthetic --workers 2 runs/cmp1m/raw_ratings.txt
.venv/bin/dnis compare --config configs/synthetic.yaml --data ratings=runs/cmp1m/data_ratings \
  --cr "${CRS:-10,20}" --seeds 2 --epochs 4 --search-epochs 2 --grid "${GRID:-1,2}" --min-row-lookups 0 \
  --methods full,grid,qr,mde,dnis_shared_half_pca --out runs/cmp1m/out_ratings_lr05 \
  --set train.sparse_lr=0.05 --set train.eval_every=400 --set train.checkpoint_every=400 \
  --set train.log_every=200 --set nis.warmup_steps=40
