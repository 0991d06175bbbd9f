#!/usr/bin/env bash
# dnis_shared_half_pca on copies of the same float32 searches as
# results/compare_1m_principal/rerun_folded/ (runs/cmp1m/out/<world>/deepfm/seed<s>/search),
# 3 seeds, CR 10 and 20 (CRS=50: CR 50), into runs/cmp1m/<out> (default out_merge).
# out_merge ran on commit 82cce5f, with thin slabs merged (THIN_SLAB_SHARE in
# pipeline/prune/knapsack.py, reverted after it); final_code/rerun.sh runs it on the code after.
out=runs/cmp1m/${1:-out_merge}
cd "$(git rev-parse --show-toplevel)"
for w in longtail flat; do for s in 0 1 2; do
  d=$out/$w/deepfm/seed$s; mkdir -p $d
  [ -d $d/search ] || cp -r runs/cmp1m/out/$w/deepfm/seed$s/search $d/
done; done
.venv/bin/dnis compare --config configs/synthetic.yaml --data longtail=runs/cmp1m/data_longtail --data flat=runs/cmp1m/data_flat \
  --cr "${CRS:-10,20}" --seeds 3 --grid 1,2 --candidates 2 --methods dnis_shared_half_pca --out $out \
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40
