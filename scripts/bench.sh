#!/usr/bin/env bash
# The kernel table: set up .venv, run `pytest bench/` and print the ratio tables
# (every available backend against the readable loop, torch.compile of it, and a softmax pass).
# Extra arguments go to pytest, e.g. `bash scripts/bench.sh --full` on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
mkdir -p runs
python -m pytest bench/ -q --benchmark-json runs/bench.json "$@"
python bench/report.py runs/bench.json
