#!/usr/bin/env bash
# Ran on commit 82cce5f (the merge was reverted after it: THIN_SLAB_SHARE no longer exists).
# dnis_shared_half_pca with thin slabs merged (pipeline/prune/knapsack.py, THIN_SLAB_SHARE),
# on copies of the same float32 searches as results/compare_1m_principal/rerun_folded/
# (runs/cmp1m/out/<world>/deepfm/seed<s>/search), 3 seeds, CR 10 and 20.
cd "$(git rev-parse --show-toplevel)"
for w in longtail flat; do for s in 0 1 2; do
  d=runs/cmp1m/out_merge/$w/deepfm/seed$s; mkdir -p $d
  [ -d $d/search ] || cp -r runs/cmp1m/out/$w/deepfm/seed$s/search $d/
done; done
.venv/bin/dnis compare --config configs/synthetic.yaml --data longtail=runs/cmp1m/data_longtail --data flat=runs/cmp1m/data_flat \
  --cr 10,20 --seeds 3 --grid 1,2 --candidates 2 --methods dnis_shared_half_pca --out runs/cmp1m/out_merge \
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40
