#!/usr/bin/env bash
# The end-to-end demo on the embedded default: synthetic Criteo-like data with a planted
# dimension signal -> preprocessing on 2 ranks -> plain training (the reference) and the
# DNIS search on 2 CPU ranks (gloo), both launched by TorchX -> test-split evaluation ->
# structured prune to CR $CR -> retrain of the repacked mixed-width model -> its 2-rank
# checkpoint evaluated on 1 rank -> fine-grained (eq. 9) prune for comparison -> fresh
# raw rows scored by the shipped model in one process -> report (JSON + PNG plots).
# Usage: scripts/demo.sh [DEMO_DIR] (ROWS=... to change the data size).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-runs/demo}
ROWS=${ROWS:-400000}
NPROC=${NPROC:-2}
CR=${CR:-10}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CONFIG=configs/synthetic.yaml
# torchx logs each launch's trackers, log directory and wait at INFO: only its warnings and errors show
TORCHX=(torchx --log_level WARNING run -s local_cwd)

step() { echo; echo "== $*"; }

step "1/11 synthetic Criteo-format data: $ROWS rows -> $DIR/raw"
mkdir -p "$DIR/raw"
[ -f "$DIR/raw/train.txt" ] || dnis-synth --rows "$ROWS" --seed 0 --out "$DIR/raw/train.txt"

step "2/11 preprocess on $NPROC ranks (frequency ranks, 8:1:1 split) -> $DIR/data"
"${TORCHX[@]}" launch/components.py:preprocess --nproc "$NPROC" \
  --output "$DIR/data" --inputs "$DIR/raw/train.txt" --dataset synthetic

rm -rf "$DIR/train" "$DIR/search" "$DIR/retrain" "$DIR/scores.parquet"  # runs start fresh; the data above is reused

step "3/11 reference: plain DeepFM on full-width sharded tables"
"${TORCHX[@]}" launch/components.py:train --config "$CONFIG" --nproc "$NPROC" \
  --overrides "data.path=$DIR/data,run.dir=$DIR/train"

step "4/11 DNIS search of α per frequency block"
"${TORCHX[@]}" launch/components.py:search --config "$CONFIG" --nproc "$NPROC" \
  --overrides "data.path=$DIR/data,run.dir=$DIR/search"

step "5/11 evaluate the searched model on the test split"
"${TORCHX[@]}" launch/components.py:evaluate --nproc "$NPROC" --run_dir "$DIR/search"

# As dnis compare's best on both 1M-row worlds (dnis_shared_half_pca): columns by worth per
# byte on each feature's principal directions, widths 1..16, rarely seen ids sharing rows.
step "6/11 structured prune to compression ratio $CR (principal columns by worth per byte, byte budget)"
"${TORCHX[@]}" launch/components.py:prune --nproc "$NPROC" --run_dir "$DIR/search" --cr "$CR" \
    --allocation value --min_row_lookups 30 --widths 1,2,4,8,16 --basis principal

step "7/11 retrain the repacked mixed-width model"
"${TORCHX[@]}" launch/components.py:retrain --nproc "$NPROC" --run_dir "$DIR/search" --out "$DIR/retrain"

step "8/11 the retrain's 2-rank checkpoint evaluated on 1 rank (tables reshard on load)"
"${TORCHX[@]}" launch/components.py:evaluate --nproc 1 --run_dir "$DIR/retrain"

step "9/11 fine-grained prune (eq. 9: |E·α| < ε zeroed, COO bytes) to CR $CR, evaluated"
"${TORCHX[@]}" launch/components.py:prune --nproc "$NPROC" --run_dir "$DIR/search" --cr "$CR" --mode fine

step "10/11 score fresh raw rows with the shipped model (one process, no process group)"
# Same generator and seed, rows past the first $ROWS: unseen rows of the same world.
if [ ! -f "$DIR/raw/fresh.txt" ]; then
  dnis-synth --rows $((ROWS + 20000)) --seed 0 --out "$DIR/raw/more.txt"
  tail -n 20000 "$DIR/raw/more.txt" > "$DIR/raw/fresh.txt" && rm "$DIR/raw/more.txt"
fi
dnis predict --run-dir "$DIR/retrain" --input "$DIR/raw/fresh.txt" --out "$DIR/scores.parquet"

step "11/11 report: α heat map, kept widths, AUC vs CR, parameters, wall times"
dnis report --run-dir "$DIR/search" --retrain "$DIR/retrain" --reference "$DIR/train"
