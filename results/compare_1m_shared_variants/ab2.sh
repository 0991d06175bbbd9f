#!/usr/bin/env bash
# 1M rows: dnis_shared_ladder on copies of the 1M compare's searches (3 seeds), then
# dnis_shared on seed 0 with today's code next to the seed-0 A/B of dnis_value / dnis_ladder.
set -e
cd /work/main
for w in longtail flat; do for s in 0 1 2; do
  d=runs/cmp1m/ab2/$w/deepfm/seed$s; mkdir -p $d
  [ -d $d/search ] || cp -r runs/cmp1m/out/$w/deepfm/seed$s/search $d/search
done; done
common=(--config configs/synthetic.yaml --data longtail=runs/cmp1m/data_longtail --data flat=runs/cmp1m/data_flat
  --cr 10,20 --grid 1,2 --candidates 2
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40)
.venv/bin/dnis compare "${common[@]}" --methods dnis_shared_ladder --seeds 3 --out runs/cmp1m/ab2
.venv/bin/dnis compare "${common[@]}" --methods dnis_value,dnis_ladder,dnis_shared --seeds 1 --out runs/cmp1m/ab
