#!/usr/bin/env bash
# dnis_shared_half_pca on the final code of session 14 (thin-slab merge reverted), same float32 searches as rerun_folded
# (runs/cmp1m/out/<world>/deepfm/seed<s>/search), 3 seeds, CR 10 and 20.
cd "$(git rev-parse --show-toplevel)"
for w in longtail flat; do for s in 0 1 2; do
  d=runs/cmp1m/out_final/$w/deepfm/seed$s; mkdir -p $d
  [ -d $d/search ] || cp -r runs/cmp1m/out/$w/deepfm/seed$s/search $d/
done; done
.venv/bin/dnis compare --config configs/synthetic.yaml --data longtail=runs/cmp1m/data_longtail --data flat=runs/cmp1m/data_flat \
  --cr 10,20 --seeds 3 --grid 1,2 --candidates 2 --methods dnis_shared_half_pca --out runs/cmp1m/out_final \
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40
