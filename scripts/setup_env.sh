#!/usr/bin/env bash
# Prepare ./.venv for development: create it if missing, install torch where it is missing
# (torch==2.13.0: a CPU wheel on machines without CUDA), then this package in editable mode with
# its test, bench, dev, triton, train and lm extras. --no-build-isolation: build against the torch just
# installed instead of downloading another one into an isolated build environment.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q ninja pybind11
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation -e ".[test,bench,dev,triton,train,lm]"
