#!/usr/bin/env bash
# README command (2): set up .venv (building the compiled extension hdkd_fast._C: a failed build fails
# here), show what was built, compile-check the CUDA sources when nvcc exists, then lint, type-check
# and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export HDKD_FAST_REQUIRE_EXT=1
bash scripts/setup_env.sh
# Real data some tests read when present: the fortunes text (the LM example) and Debian's Fashion-MNIST.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && { [ ! -d /usr/share/games/fortunes ] || [ ! -d /usr/share/datasets/fashion-mnist ]; }; then
  { apt-get update -qq && apt-get install -y -qq fortunes dataset-fashion-mnist >/dev/null; } \
    || echo "apt-get could not install fortunes / dataset-fashion-mnist: the tests that read them are skipped"
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m hdkd_fast.info
bash scripts/check_cuda_compile.sh
ruff check .
mypy
python -m pytest tests/ -q
