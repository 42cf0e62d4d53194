#!/usr/bin/env bash
# The GPU check of issue 13, in one go, on a bare H100/H200 machine (Python 3.12, torch + CUDA, triton,
# nvcc; no network). Run from anywhere; results go to $OUT (default runs/gpu_check):
#   gpu_check.md (the report: stages, targets with measured value and PASS/FAIL, test errors, floors),
#   gpu_check.json (everything), bench.json and fused_linear.json (pytest-benchmark's), build.log, gpu_check.log (all output).
#
#   bash scripts/gpu_check.sh                 # the GPU run: wheels, build (sm_90), scripts/gpu_check.py
#   bash scripts/gpu_check.sh --dry-run       # the same stages on the CPU, tiny shapes, Triton interpreter
#   bash scripts/gpu_check.sh --fetch-wheels  # here, with network: Liger-Kernel's wheel into .whl/
#
# Options: --wheels DIR (wheels to install with pip --no-index into a private --target first; default
# .whl when it exists), --budget-s N (the whole script, build included; default 480 on a GPU, 240 dry),
# --no-build (use the installed hdkd_fast).
#
# Liger-Kernel (the peer kernel of the bench) is pure Python + Triton but is not installed on the GPU
# machines and they have no network: fetch its wheel here (--fetch-wheels; .whl/ is git-ignored) and
# carry .whl with the run (the device tool's `carry: [".whl"]`). Without it, the bench reports liger as
# "not available" and the Liger target as not measured.
#
# Stages: wheels, build (FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 pip install --no-build-isolation
# --no-index --no-deps .; a failure is printed with the end of build.log and the check goes on from the
# source tree without the extension), then scripts/gpu_check.py: environment, tests, hdkd_step, train_cli,
# bench (see its docstring). Each stage prints its budget and elapsed time; a failing stage does not stop
# the later ones; the exit status is 1 when any stage failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"

dry=0 fetch=0 build=1 budget="" wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --fetch-wheels) fetch=1 ;;
    --no-build) build=0 ;;
    --budget-s) budget="$2"; shift ;;
    --wheels) wheels="$2"; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$fetch" = 1 ]; then
  # Pure-Python wheel: any platform tag matches; pinned so that a run is reproducible.
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d .whl "liger-kernel==${LIGER_VERSION:-0.8.5}"
  exit $?
fi

if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ "$dry" = 1 ] && [ -x .venv/bin/python ]; then py="$root/.venv/bin/python"
else py="python3"; fi
[ -n "$budget" ] || budget=$([ "$dry" = 1 ] && echo 240 || echo 480)
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
t0=$(date +%s%N)
elapsed() {  # seconds since $1 (date +%s%N), one decimal
  local ms=$(( ($(date +%s%N) - $1) / 1000000 ))
  printf '%d.%d' $((ms / 1000)) $(((ms % 1000) / 100))
}
echo "gpu_check: $([ "$dry" = 1 ] && echo "DRY RUN on the CPU" || echo "GPU run") at $(date -u '+%F %T UTC');" \
  "python $py; OUT=$OUT; budget ${budget} s"

if [ "$dry" = 1 ]; then
  export TRITON_INTERPRET=1 HDKD_FAST_TRITON_BLOCK_C=16 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || true
  if ! command -v nvcc >/dev/null 2>&1; then  # torch's cpp_extension finds nvcc through CUDA_HOME or PATH
    for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
      if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d" PATH="$d/bin:$PATH"; break; fi
    done
  fi
  echo "nvcc: $(nvcc --version 2>&1 | tail -n 1)"
fi

# -- stage wheels ---------------------------------------------------------------------------------
[ -n "$wheels" ] || { [ -d .whl ] && wheels=.whl; }
if [ -n "$wheels" ] && compgen -G "$wheels/*.whl" >/dev/null; then
  t=$(date +%s%N)
  site="${TMPDIR:-/tmp}/hdkd_gpu_check_site"
  if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "$wheels"/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "== stage wheels: PASS in $(elapsed "$t") s: $(cd "$wheels" && ls ./*.whl | tr '\n' ' ')"
  else
    echo "== stage wheels: FAIL in $(elapsed "$t") s (the bench reports liger as not available)"
  fi
else
  echo "== stage wheels: none (no .whl/ or --wheels DIR): liger will be reported as not available"
fi

# -- stage build ----------------------------------------------------------------------------------
build_status=skipped build_s=0 build_note=""
build_cmd=(env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 HDKD_FAST_REQUIRE_EXT=1
           "$py" -m pip install --no-build-isolation --no-index --no-deps -v .)
if [ "$dry" = 1 ] || [ "$build" = 0 ]; then
  echo "== stage build: skipped ($([ "$dry" = 1 ] && echo "dry run" || echo "--no-build")); the GPU run runs:" \
    "${build_cmd[*]}"
  if "$py" -P -c "import hdkd_fast._C" 2>/dev/null; then build_note="existing install (hdkd_fast._C imports)"
  else build_note="existing install without hdkd_fast._C"; fi
else
  echo "== stage build: ${build_cmd[*]}  (log: $OUT/build.log)"
  t=$(date +%s%N)
  if "${build_cmd[@]}" > "$OUT/build.log" 2>&1 \
      && "$py" -P -c "import hdkd_fast._C as C, sys; sys.exit(0 if C.with_cuda else 'built without CUDA kernels')" \
         >> "$OUT/build.log" 2>&1; then
    build_status=pass
    build_note="hdkd_fast._C with CUDA kernels for sm_90"
  else
    build_status=fail
    build_note="BUILD FAILED: see build.log; the check goes on from the source tree without hdkd_fast._C"
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    echo "gpu_check: THE BUILD FAILED; the end of $OUT/build.log:"
    tail -n 60 "$OUT/build.log"
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
    export HDKD_FAST_NO_EXT=1  # no second try at the build on first use: GPU minutes are scarce
  fi
  build_s=$(elapsed "$t")
  echo "== stage build: ${build_status^^} in ${build_s} s"
fi

# -- the Python stages ----------------------------------------------------------------------------
left=$(( budget - ($(date +%s%N) - t0) / 1000000000 - 5 ))
args=(--out "$OUT" --budget-s "$left" --build-status "$build_status" --build-seconds "$build_s"
      --build-note "$build_note")
[ "$dry" = 1 ] && args+=(--dry-run)
PYTHONUNBUFFERED=1 "$py" "$root/scripts/gpu_check.py" "${args[@]}"
rc=$?
echo "gpu_check: finished in $(elapsed "$t0") s (budget ${budget} s), exit status $rc; reports in $OUT"
exit "$rc"
