cd /work/main
# fp32 α gradient with alpha_lr perturbed by 0.4% (bf16's relative rounding): is long-tail seed 1's retrained AUC this sensitive to any small change?
.venv/bin/dnis compare --config configs/synthetic.yaml --data longtail=runs/cmp1m/data_longtail \
  --cr 10,20 --seeds 2 --grid 1,2 --candidates 2 --methods dnis_shared_half_pca --out runs/cmp1m/out_pert \
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40 \
  --set search.alpha_grad_dtype=float32 --set search.alpha_lr=0.01004
