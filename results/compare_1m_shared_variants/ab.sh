#!/usr/bin/env bash
# 1M rows, seed 0: dnis_value vs dnis_ladder on copies of the 1M compare's searches, today's code.
set -e
cd /work/main
for w in longtail flat; do
  d=runs/cmp1m/ab/$w/deepfm/seed0; mkdir -p $d
  [ -d $d/search ] || cp -r runs/cmp1m/out/$w/deepfm/seed0/search $d/search
done
.venv/bin/dnis compare --config configs/synthetic.yaml --data longtail=runs/cmp1m/data_longtail --data flat=runs/cmp1m/data_flat \
  --methods dnis_value,dnis_ladder --cr 10,20 --seeds 1 --grid 1,2 --candidates 2 --out runs/cmp1m/ab \
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40
