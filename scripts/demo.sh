#!/usr/bin/env bash
# The end-to-end demo on the embedded default: synthetic Criteo-like data with a planted
# dimension signal -> preprocessing on 2 ranks -> plain training (the reference) and the
# DNIS search on 2 CPU ranks (gloo), both launched by TorchX -> test-split evaluation ->
# structured prune to CR $CR -> retrain of the repacked mixed-width model.
# Usage: scripts/demo.sh [DEMO_DIR] (ROWS=... to change the data size).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-runs/demo}
ROWS=${ROWS:-400000}
NPROC=${NPROC:-2}
CR=${CR:-10}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CONFIG=configs/synthetic.yaml
TORCHX=(torchx run -s local_cwd)

step() { echo; echo "== $*"; }

step "1/7 synthetic Criteo-format data: $ROWS rows -> $DIR/raw"
mkdir -p "$DIR/raw"
[ -f "$DIR/raw/train.txt" ] || dnis-synth --rows "$ROWS" --seed 0 --out "$DIR/raw/train.txt"

step "2/7 preprocess on $NPROC ranks (frequency ranks, 8:1:1 split) -> $DIR/data"
"${TORCHX[@]}" launch/components.py:preprocess --nproc "$NPROC" \
  --output "$DIR/data" --inputs "$DIR/raw/train.txt" --dataset synthetic

rm -rf "$DIR/train" "$DIR/search" "$DIR/retrain"  # runs start fresh; the data above is reused

step "3/7 reference: plain DeepFM on full-width sharded tables"
"${TORCHX[@]}" launch/components.py:train --config "$CONFIG" --nproc "$NPROC" \
  --overrides "data.path=$DIR/data,run.dir=$DIR/train"

step "4/7 DNIS search of α per frequency block"
"${TORCHX[@]}" launch/components.py:search --config "$CONFIG" --nproc "$NPROC" \
  --overrides "data.path=$DIR/data,run.dir=$DIR/search"

step "5/7 evaluate the searched model on the test split"
"${TORCHX[@]}" launch/components.py:evaluate --nproc "$NPROC" --run_dir "$DIR/search"

step "6/7 structured prune to compression ratio $CR (α × column RMS, byte budget)"
"${TORCHX[@]}" launch/components.py:prune --nproc "$NPROC" --run_dir "$DIR/search" --cr "$CR"

step "7/7 retrain the repacked mixed-width model"
"${TORCHX[@]}" launch/components.py:retrain --nproc "$NPROC" --run_dir "$DIR/search" --out "$DIR/retrain"

summary() { python3 -c "import json,sys; r=json.load(open(sys.argv[1])); t=r['test']; print(f\"test auc {t['auc']:.4f} logloss {t['logloss']:.4f}\" + (f\"  (CR {r['compression_ratio']:.1f}; before retraining auc {r['before_retrain']['auc']:.4f})\" if 'before_retrain' in r else ''))" "$1"; }
echo
echo "reference (full tables):   $(summary "$DIR/train/result.json")"
echo "search (α-scaled tables):  $(summary "$DIR/search/result.json")"
echo "pruned + retrained:        $(summary "$DIR/retrain/result.json")"
echo "α table: $DIR/search/alpha.json; plan: $DIR/search/prune.json; metrics: $DIR/*/metrics.jsonl"
