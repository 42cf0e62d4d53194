#!/usr/bin/env bash
# README command (1), the main job: set up .venv, then train `ce`, `dbt` and `hdkd` on the embedded
# default data set (scikit-learn's 8×8 handwritten digits: nothing to download) and print their
# per-exit test accuracy side by side, with where the plots are. About 2 minutes of training on
# 2 CPU cores. Extra arguments go to every `hdkd-fast train` (e.g. `--epochs 30`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# The digits model is small: one thread per process is faster than two fighting over two cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="runs/demo-$(date +%Y%m%d-%H%M%S)"
for method in ce dbt hdkd; do
  echo "== hdkd-fast train --method $method --out $out/$method $*"
  hdkd-fast train --method "$method" --out "$out/$method" --device cpu "$@"
done
hdkd-fast evaluate --compare "$out/ce" "$out/dbt" "$out/hdkd" --out "$out/compare"
echo "runs, metrics and plots: $out (per run: metrics.jsonl, final.json, *.png; comparison: $out/compare)"
