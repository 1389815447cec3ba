#!/usr/bin/env bash
# Install scoresde (editable) with its test and benchmark extras, reusing what is there.
#
# torch is the one heavy dependency: an installed torch (CPU or CUDA) is kept as it is;
# without one, we ask for torch==2.13.0 explicitly, because a loose `torch` requirement
# in a fresh environment resolves to a multi-GB CUDA build. Everything else comes from the
# package index. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
torch_req=()
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  torch_req=("torch==${SCORESDE_TORCH_VERSION:-2.13.0}")
fi
"$PY" -m pip install --quiet --disable-pip-version-check "${torch_req[@]}" -e ".[dev,bench]"
"$PY" -c "import scoresde, torch; print(f'scoresde {scoresde.__version__} ready (torch {torch.__version__})')"
