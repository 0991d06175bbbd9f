cd /work/main
.venv/bin/dnis compare --config configs/synthetic.yaml --data longtail=runs/cmp1m/data_longtail --data flat=runs/cmp1m/data_flat \
  --cr 10,20 --seeds 3 --grid 1,2 --candidates 2 --methods dnis_shared_half_pca --out runs/cmp1m/out_bf16 \
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40
