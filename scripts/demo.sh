#!/usr/bin/env bash
# The end-to-end demo on the embedded default: synthetic Criteo-like data with a planted
# dimension signal -> preprocessing on 2 ranks -> plain training (the reference) and the
# DNIS search on 2 CPU ranks (gloo), both launched by TorchX -> test-split evaluation.
# Usage: scripts/demo.sh [DEMO_DIR] (ROWS=... to change the data size).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-runs/demo}
ROWS=${ROWS:-400000}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CONFIG=configs/synthetic.yaml
TORCHX=(torchx run -s local_cwd)

step() { echo; echo "== $*"; }

step "1/5 synthetic Criteo-format data: $ROWS rows -> $DIR/raw"
mkdir -p "$DIR/raw"
[ -f "$DIR/raw/train.txt" ] || dnis-synth --rows "$ROWS" --seed 0 --out "$DIR/raw/train.txt"

step "2/5 preprocess on $NPROC ranks (frequency ranks, 8:1:1 split) -> $DIR/data"
"${TORCHX[@]}" launch/components.py:preprocess --nproc "$NPROC" \
  --output "$DIR/data" --inputs "$DIR/raw/train.txt" --dataset synthetic

rm -rf "$DIR/train" "$DIR/search"  # runs start fresh; the data above is reused

step "3/5 reference: plain DeepFM on full-width sharded tables"
"${TORCHX[@]}" launch/components.py:train --config "$CONFIG" --nproc "$NPROC" \
  --overrides "data.path=$DIR/data,run.dir=$DIR/train"

step "4/5 DNIS search of α per frequency block"
"${TORCHX[@]}" launch/components.py:search --config "$CONFIG" --nproc "$NPROC" \
  --overrides "data.path=$DIR/data,run.dir=$DIR/search"

step "5/5 evaluate the searched model on the test split"
"${TORCHX[@]}" launch/components.py:evaluate --nproc "$NPROC" --run_dir "$DIR/search"

echo
echo "reference: $(cat "$DIR/train/result.json" | tr -d '\n ')"
echo "search:    $(cat "$DIR/search/result.json" | tr -d '\n ')"
echo "α table:   $DIR/search/alpha.json; metrics: $DIR/*/metrics.jsonl"
