#!/usr/bin/env bash
# Per-field blocking (blocking.per_field: each field its own 6 frequency blocks) on the
# two 1M worlds, the shipped method (dnis_shared_half_pca), 3 seeds, CR 10, into
# runs/cmp1m/out_per_field: new searches with the settings of the global-blocking
# searches that ../compare_1m_projection_cost/ retrained (runs/cmp1m/out/<world>/deepfm/
# seed<s>/search; alpha's gradient in float32, as before bfloat16 became the default),
# so that the blocking is what differs. The rating log (../compare_1m_ratings/long.sh,
# PER_FIELD=1) asked for this before per-field blocking could become the default.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
.venv/bin/dnis compare --config configs/synthetic.yaml --data longtail=runs/cmp1m/data_longtail --data flat=runs/cmp1m/data_flat \
  --cr "${CRS:-10}" --seeds 3 --grid 1,2 --candidates 2 --methods dnis_shared_half_pca --out runs/cmp1m/out_per_field \
  --set blocking.per_field=true --set search.alpha_grad_dtype=float32 \
  --set train.eval_every=200 --set train.checkpoint_every=200 --set train.log_every=200 --set nis.warmup_steps=40
