#!/usr/bin/env bash
# Create .venv (idempotent) and install the pinned CPU stack plus this package.
# Re-running is cheap: a stamp file records the hash of requirements/cpu.txt and
# pyproject.toml, and nothing is reinstalled while both are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
REQS=requirements/cpu.txt
STAMP="$VENV/.installed"
want=$(cat "$REQS" pyproject.toml | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# Everything but torchrec, resolved together against the pins.
"${PIP[@]}" install -r <(grep -v -E '^torchrec==' "$REQS")
# torchrec without its deps: see the note at the top of requirements/cpu.txt.
"${PIP[@]}" install --no-deps "$(grep -E '^torchrec==' "$REQS")"
# This package, editable, without deps (they are all pinned above).
"${PIP[@]}" install --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import torchrec, fbgemm_gpu, torchx, pipeline, plans, sharding, launch"
echo "$want" > "$STAMP"
echo "setup: $VENV ready"
