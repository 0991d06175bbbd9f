set -e
cd /work/main
[ -d runs/cmp1m/data_flat ] || { .venv/bin/dnis-synth --rows 1000000 --world flat --out runs/cmp1m/raw_flat.txt;
  .venv/bin/dnis-preprocess --output runs/cmp1m/data_flat --dataset synthetic --workers 2 runs/cmp1m/raw_flat.txt; }
.venv/bin/dnis compare --config configs/synthetic.yaml --data longtail=runs/cmp1m/data_longtail --data flat=runs/cmp1m/data_flat \
  --cr 10,20 --seeds 3 --grid 1,2 --candidates 2 --methods dnis_shared_half_int8_pca --out runs/cmp1m/out \
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40
