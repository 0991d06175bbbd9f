#!/usr/bin/env bash
# CR 50: dnis_shared_ladder and dnis_shared_half on the same search copies, 3 seeds.
set -e
cd /work/main
.venv/bin/dnis compare --config configs/synthetic.yaml --data longtail=runs/cmp1m/data_longtail --data flat=runs/cmp1m/data_flat \
  --cr 50 --grid 1,2 --candidates 2 \
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40 \
  --methods dnis_shared_ladder,dnis_shared_half --seeds 3 --out runs/cmp1m/ab2
