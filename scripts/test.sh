#!/usr/bin/env bash
# README command (2): set up .venv, then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
mypy
python -m pytest tests/ -q
