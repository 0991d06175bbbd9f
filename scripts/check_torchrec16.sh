#!/usr/bin/env bash
# Run the test suite against the GPU machines' pair: torch 2.11 + fbgemm-gpu 1.6.0 +
# torchrec 1.6.1 (see requirements/cpu.txt), here on CPU with fbgemm-gpu-cpu 1.6.0.
# The code must use only APIs present in both 1.6 and 1.8; this is how to check it
# without a GPU. Not part of CI: the venv is several GB (PyPI's torch 2.11 is the CUDA
# build; it runs on CPU) and the suite takes about 7 minutes on 2 cores.
#
#   bash scripts/check_torchrec16.sh [VENV] [PYTEST ARGS...]   # VENV: /work/venv16
#
# Idempotent: the venv is reused while requirements/cpu.txt and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-/work/venv16}
shift || true
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
REQS=requirements/cpu.txt
STAMP="$VENV/.installed-torchrec16"
want=$(cat "$REQS" "$0" | sha256sum | cut -d' ' -f1)

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  "${PIP[@]}" install --upgrade pip
  # One resolve: the 1.6 stack plus every other pin of requirements/cpu.txt, except
  # setuptools, which torch 2.11 wants below 82 (81.0.0 is the nearest).
  reqs=$(mktemp)
  { echo "torch==2.11.0"; echo "fbgemm-gpu-cpu==1.6.0"
    grep -v -E '^(torch|fbgemm-gpu-cpu|torchrec|setuptools)==' "$REQS"
    echo "setuptools==81.0.0"; } > "$reqs"
  "${PIP[@]}" install -r "$reqs"
  rm -f "$reqs"
  # torchrec without its deps, as scripts/setup.sh does (it asks for CUDA fbgemm-gpu).
  "${PIP[@]}" install --no-deps torchrec==1.6.1
  echo "$want" > "$STAMP"
fi
# This checkout, editable (the tests run its console scripts): cheap, and it points
# the venv at whichever checkout ran this last.
"$VENV/bin/python" -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation -e .
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version
import fbgemm_gpu, torch, torchrec  # noqa: F401
got = {p: version(p) for p in ("torch", "fbgemm-gpu-cpu", "torchrec")}
print("check_torchrec16:", ", ".join(f"{p} {v}" for p, v in got.items()))
assert got["torch"].startswith("2.11.0") and got["fbgemm-gpu-cpu"] == "1.6.0" and got["torchrec"] == "1.6.1", got
EOF
# The flags of the Makefile's test target.
OMP_NUM_THREADS=1 PYTHONPATH=$PWD exec "$VENV/bin/python" -m pytest -q -x --durations=15 "$@"
