#!/usr/bin/env bash
# One-call GPU check: the CUDA path end to end on a machine with one NVIDIA GPU, in well
# under 10 minutes, ending with one summary table.
#
#   here, once:   bash scripts/gpu_check.sh stage
#                 (../shared/gpu/stage.sh, plus the cp312 wheels the GPU image lacks)
#   there:        the staging calls of ../shared/GPU.md; in the last one, after
#                 `bash .gpustage/small/final.sh`:   bash scripts/gpu_check.sh run
#
# `run` checks: versions and the device; NCCL with one rank per GPU (the CPU tests'
# two ranks per device cannot run there); a search with FBGEMM's fused Adam tables (GPU
# only) -> structured prune -> retrain -> evaluate on GPU -> load_model scoring raw rows;
# the `gpu` tests (shard_quant_model of the int8 repacked tables); the search-overhead
# benchmark on one GPU rank and the inference benchmark. Logs go to $OUT (or
# /tmp/gpu_check). GPU_CHECK_CPU=1 runs the same steps on a CPU machine (gloo, row-wise
# Adagrad): a check of this script itself, not of the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
LOG=${OUT:-/tmp/gpu_check}
WORK=/tmp/gpu_check_work
mkdir -p "$LOG"

if [ "$mode" = stage ]; then
  set -e
  bash ../shared/gpu/stage.sh
  # PyYAML (configs) and safetensors (the shipped artifact) are not in the GPU image.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpustage/small \
    "$(grep -E '^PyYAML==' requirements/cpu.txt)" $(grep -E '^safetensors==' requirements/cpu.txt || true)
  echo "staged: now the calls of ../shared/GPU.md, the last one ending in 'bash scripts/gpu_check.sh run'"
  exit 0
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}
TORCHRUN=("$PY" -m torch.distributed.run --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint localhost:0)
OPT=adam
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  OPT=rowwise_adagrad
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device (GPU_CHECK_CPU=1 runs the same steps on CPU)"; exit 2
fi
rm -rf "$WORK" && mkdir -p "$WORK"
SET=(--config configs/synthetic.yaml --set "data.path=$WORK/data" --set train.sparse_optimizer=$OPT
     --set train.eval_every=100 --set train.checkpoint_every=100 --no-progress)
summary=()

step() {  # step NAME COMMAND...: run, log, time; the table gets the status and last result line
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  local said
  said=$(grep -E "test auc|ratio|passed|failed|SANITY|cuda|error|Error" "$LOG/$name.log" | tail -1 | cut -c1-110)
  summary+=("$(printf '%-16s %-4s %5ss  %s' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" $((SECONDS - start)) "$said")")
  return $rc
}

step versions "$PY" -c "import torch, fbgemm_gpu, torchrec; print('torch', torch.__version__, 'torchrec', torchrec.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
step data bash -c "$PY -m pipeline.data.synth --rows 220000 --seed 0 --out $WORK/raw.txt && tail -n 20000 $WORK/raw.txt > $WORK/fresh.txt && head -n 200000 $WORK/raw.txt > $WORK/train.txt && $PY -m pipeline.data.preprocess --output $WORK/data --dataset synthetic $WORK/train.txt"
step search "${TORCHRUN[@]}" -m launch.search "${SET[@]}" --set "run.dir=$WORK/search"
step prune "${TORCHRUN[@]}" -m launch.prune --run-dir "$WORK/search" --cr 10
step retrain "${TORCHRUN[@]}" -m launch.retrain --run-dir "$WORK/search" --out "$WORK/retrain" --no-progress
step evaluate "${TORCHRUN[@]}" -m launch.evaluate --run-dir "$WORK/retrain" --split test --no-progress
step predict "$PY" -m launch.predict --run-dir "$WORK/retrain" --input "$WORK/fresh.txt" --out "$WORK/scores.parquet"
step gpu_tests "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
step overhead "$PY" benchmarks/search_overhead.py --ranks 1 --steps 5 --rounds 4
step inference "$PY" benchmarks/inference.py --rows 100000 --rounds 5

echo
echo "== gpu_check summary ($(date -u +%FT%TZ); logs in $LOG)"
printf '%s\n' "${summary[@]}" | tee "$LOG/summary.txt"
! grep -q " FAIL " "$LOG/summary.txt"
