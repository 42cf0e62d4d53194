#!/usr/bin/env bash
# README command (2): set up .venv (building the compiled extension hdkd_fast._C: a failed build fails
# here), show what was built, compile-check the CUDA sources when nvcc exists, then lint, type-check
# and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export HDKD_FAST_REQUIRE_EXT=1
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m hdkd_fast.info
bash scripts/check_cuda_compile.sh
ruff check .
mypy
python -m pytest tests/ -q
