#!/usr/bin/env bash
# A/B on the same searches with today's code: dnis_value (every width) vs dnis_ladder (1,2,4,...,32).
# The 300k compare's own dnis_value runs predate nested column orders, so they are not reused.
set -e
cd /work/main
for w in longtail flat; do for s in 0 1 2; do
  d=runs/cmp/ab/$w/deepfm/seed$s; mkdir -p $d
  [ -d $d/search ] || cp -r runs/cmp/out/$w/deepfm/seed$s/search $d/search
  [ -d $d/dnis_ladder ] || cp -r runs/cmp/out/$w/deepfm/seed$s/dnis_ladder $d/dnis_ladder
done; done
.venv/bin/dnis compare --config configs/synthetic.yaml --data longtail=runs/cmp/data_longtail --data flat=runs/cmp/data_flat \
  --methods dnis_value,dnis_ladder --cr 10,20 --seeds 3 --grid 1,2 --candidates 2 --out runs/cmp/ab \
  --set train.eval_every=50 --set train.checkpoint_every=50 --set train.log_every=50 --set nis.warmup_steps=40
