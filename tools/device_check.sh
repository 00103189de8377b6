#!/usr/bin/env bash
# tools/device_check.sh: everything a lent H200 should check, in ONE call (see ../shared/GPU.md).
#
#   builds the extension (MAX_JOBS=16, sm_90a) -> runs `gptkernels selftest` (every kernel family
#   against its reference, JSON in $OUT/selftest.json) -> runs the CUDA tests -> runs the quick
#   benchmarks -> writes the log, junit XML, benchmark JSON and a tarball of CSV/PNGs under $OUT
#   -> prints a short table last. Every step is bounded by what is left of an internal budget.
#   When a family fails the self-test, the rest of the time goes to that failure: only the failing
#   families' CUDA tests run (then compute-sanitizer on their small cases), no benchmarks, exit 1.
#
# Usage (from the repo root, on the device):
#   GPTK_GIT_COMMIT=<sha> bash tools/device_check.sh [--budget S] [--tests EXPR] [--ops a,b] [--no-bench]
#                                                  [--sanitize] [--full-bench] [--e2e] [--hf] [--generate] [--no-selftest]
#                                                  [--attention-sm90]
#   --budget S     total seconds for the whole script (default 540); --test-budget S caps the tests (240)
#   --tests EXPR   pytest -k expression for the CUDA tests (default: all tests marked cuda)
#   --ops a,b      benchmarks to run (default: all benchmarks/bench_*.py)
#   --sanitize     also run compute-sanitizer (memcheck, racecheck, synccheck) on a few small kernel tests
#   --sanitize-tests EXPR  pytest -k expression for those (default "small or sanitize")
#   --bench-modes M        only time these modes (benchmarks.run --modes, e.g. fwd)
#   --e2e          also run the end-to-end training benchmark (benchmarks/e2e_train.py) if present
#   --no-selftest  skip the self-test (and its early stop)
#   --hf           also run the Hugging Face benchmark (benchmarks/e2e_hf.py --quick: GPT-2 124M and a
#                  125M Llama, eager / sdpa / gptkernels.hf.patch, train step + generate)
#   --generate     also run the generation benchmark (benchmarks/bench_generate.py --quick) if present
#   --attention-sm90  preset for the Hopper attention forward and backward (issues 11, 12): the attention
#                  CUDA tests on both forward kernels (sm80, sm90) and the sm90 backward tests, the three
#                  sanitizers on the small sm90 forward and backward shapes, then the full attention
#                  forward grid (sm90, sm80, SDPA flash, SDPA cuDNN); no self-test.
# Afterwards, copy $OUT/device-bench.json (and the unpacked tarball) into benchmarks/results/.
set -uo pipefail
BUDGET=540; TEST_BUDGET=240; TESTS=""; OPS=""; BENCH=1; SANITIZE=0; FULL=""; E2E=0; SELFTEST=1; HF=0; GEN=0
SAN_TESTS="small or sanitize"; BENCH_MODES=""
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET=$2; shift 2;;
    --test-budget) TEST_BUDGET=$2; shift 2;;
    --tests) TESTS=$2; shift 2;;
    --ops) OPS=$2; shift 2;;
    --no-bench) BENCH=0; shift;;
    --full-bench) FULL=1; shift;;
    --sanitize) SANITIZE=1; shift;;
    --sanitize-tests) SAN_TESTS=$2; shift 2;;
    --bench-modes) BENCH_MODES=$2; shift 2;;
    --attention-sm90) TESTS="test_attention and (fwd or sm90 or kv_cache)"; SANITIZE=1; SELFTEST=0
                      SAN_TESTS="(fwd_small_sanitize or bwd_small_sanitize) and sm90"; OPS=attention; FULL=1; BENCH_MODES=fwd; shift;;
    --e2e) E2E=1; shift;;
    --no-selftest) SELFTEST=0; shift;;
    --hf) HF=1; shift;;
    --generate) GEN=1; shift;;
    *) echo "device_check.sh: unknown argument $1" >&2; exit 2;;
  esac
done
OUT=${OUT:-/tmp/gptk_device_out}
mkdir -p "$OUT"
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
LOG="$OUT/device_check.log"
exec > >(tee -a "$LOG") 2>&1

export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} GPTKERNELS_CUDA_ARCHS=${GPTKERNELS_CUDA_ARCHS:-90a}
export GPTKERNELS_REQUIRE_EXT=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPTKERNELS_CACHE=${GPTKERNELS_CACHE:-/tmp/gptk-cache}  # self-test verdicts, datasets: not under $OUT
export GPTK_GIT_COMMIT=${GPTK_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
PY=${PYTHON:-python3}
status() { echo "== [$(( $(date +%s) - START ))s] $*"; }

status "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
status "commit $GPTK_GIT_COMMIT; torch $($PY -c 'import torch;print(torch.__version__, torch.version.cuda)')"

status "build (archs $GPTKERNELS_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS)"
BUILD_RC=0
timeout $(( $(left) - 60 )) $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || BUILD_RC=$?
grep -E "error|warning: .*spill" "$OUT/build.log" | head -20
status "build rc=$BUILD_RC"
if [ $BUILD_RC -ne 0 ]; then tail -40 "$OUT/build.log"; exit 1; fi
$PY -m gptkernels info
[ -f tools/sass_check.py ] && $PY tools/sass_check.py --json "$OUT/sass_check.json" 2>&1 | tail -8

# The self-test first (python -m gptkernels._selftest is `gptkernels selftest`): rc 0 all passed,
# 1 a family failed, 2 nothing to test, 124 timed out, anything else: it died (e.g. in a kernel).
FAILED_FAMILIES=""
if [ $SELFTEST -eq 1 ]; then
  status "self-test: every kernel family against its reference"
  T=$(( $(left) - 60 )); [ $T -gt 150 ] && T=150
  rm -f "$OUT/selftest.json"
  timeout $T $PY -m gptkernels._selftest --json "$OUT/selftest.json" 2>&1
  ST_RC=$?
  status "selftest rc=$ST_RC"
  if [ $ST_RC -ne 0 ]; then
    FAILED_FAMILIES=$($PY -c "import json,sys; d=json.load(open(sys.argv[1])); \
print(' '.join(k for k, v in d['families'].items() if not v['ok']))" "$OUT/selftest.json" 2>/dev/null)
    [ -z "$FAILED_FAMILIES" ] && FAILED_FAMILIES=all  # it died or timed out before writing its verdicts
  fi
fi

if [ -n "$FAILED_FAMILIES" ]; then
  declare -A FAMILY_TESTS=([bias_act]=tests/test_activation.py [layer_norm]=tests/test_layernorm.py
    [cross_entropy]=tests/test_loss.py [linear_cross_entropy]=tests/test_loss.py
    [mlp]=tests/test_mlp.py [attention]="tests/test_attention.py tests/test_attention_variants.py")
  FILES=()
  for f in $FAILED_FAMILIES; do
    for t in ${FAMILY_TESTS[$f]:-tests/}; do [[ " ${FILES[*]} " == *" $t "* ]] || FILES+=("$t"); done
  done
  status "SELF-TEST FAILED ($FAILED_FAMILIES): the time left goes to it: CUDA tests of ${FILES[*]}"
  T=$(( $(left) - 90 )); [ $T -gt $TEST_BUDGET ] && T=$TEST_BUDGET
  [ $T -gt 30 ] && timeout $T $PY -m pytest -q -m cuda --maxfail=30 -rf -p no:cacheprovider \
      --junitxml="$OUT/pytest-cuda.xml" "${FILES[@]}" > "$OUT/pytest-cuda.log" 2>&1
  grep -E "^(FAILED|ERROR)" "$OUT/pytest-cuda.log" | head -30; tail -3 "$OUT/pytest-cuda.log"
  if [ "$(left)" -gt 60 ] && command -v compute-sanitizer >/dev/null; then
    status "compute-sanitizer memcheck on the failing families' small cases"
    timeout $(( $(left) - 30 )) compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -m cuda \
        -p no:cacheprovider -k "small or sanitize" "${FILES[@]}" 2>&1 | tail -20
  fi
  status "summary: the self-test FAILED for $FAILED_FAMILIES (details above and in $OUT/selftest.json); no benchmarks"
  exit 1
fi

TEST_RC=-1
if [ "$(left)" -gt 60 ]; then
  status "CUDA tests (${TESTS:-all marked cuda})"
  KARGS=(); [ -n "$TESTS" ] && KARGS=(-k "$TESTS")
  T=$(( $(left) - 45 )); [ $T -gt $TEST_BUDGET ] && T=$TEST_BUDGET
  timeout $T $PY -m pytest -q -m cuda --maxfail=50 -rf -p no:cacheprovider "${KARGS[@]}" \
      --junitxml="$OUT/pytest-cuda.xml" tests/ > "$OUT/pytest-cuda.log" 2>&1
  TEST_RC=$?
  grep -E "^(FAILED|ERROR)" "$OUT/pytest-cuda.log" | head -30; tail -3 "$OUT/pytest-cuda.log"
  status "tests rc=$TEST_RC (124 = hit the test budget)"
fi

if [ $SANITIZE -eq 1 ] && command -v compute-sanitizer >/dev/null; then
  for TOOL in memcheck racecheck synccheck; do
    [ "$(left)" -gt 90 ] || break
    status "compute-sanitizer $TOOL on: $SAN_TESTS"
    T=$(( $(left) - 60 )); [ $T -gt 150 ] && T=150
    timeout $T compute-sanitizer --tool $TOOL --error-exitcode 9 $PY -m pytest -q -m cuda -x \
        -p no:cacheprovider -k "$SAN_TESTS" tests/ > "$OUT/sanitizer-$TOOL.log" 2>&1
    RC=$?
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer-$TOOL.log" | tail -4
    status "sanitizer $TOOL rc=$RC (9 = errors found, 124 = timeout)"
  done
fi

if [ $BENCH -eq 1 ] && [ "$(left)" -gt 45 ]; then
  status "benchmarks (${OPS:-all}, ${FULL:+full}${FULL:-quick})"
  BARGS=(--out "$OUT/bench" --stem device-bench); [ -z "$FULL" ] && BARGS+=(--quick); [ -n "$OPS" ] && BARGS+=(--ops "$OPS")
  [ -n "$BENCH_MODES" ] && BARGS+=(--modes "$BENCH_MODES")
  timeout $(( $(left) - 20 )) $PY -m benchmarks.run "${BARGS[@]}" > "$OUT/bench.log" 2>&1
  status "bench rc=$?"
fi

if [ $E2E -eq 1 ] && [ -f benchmarks/e2e_train.py ] && [ "$(left)" -gt 60 ]; then
  status "end-to-end training benchmark"
  timeout $(( $(left) - 15 )) $PY -m benchmarks.e2e_train --out "$OUT/bench" 2>&1 | tail -20
fi

if [ $HF -eq 1 ] && [ -f benchmarks/e2e_hf.py ] && [ "$(left)" -gt 60 ]; then
  status "Hugging Face benchmark (e2e_hf --quick)"
  timeout $(( $(left) - 15 )) $PY -m benchmarks.e2e_hf --quick --out "$OUT/bench" 2>&1 | grep -v "^\[transformers\]" | tail -20
fi

if [ $GEN -eq 1 ] && [ -f benchmarks/bench_generate.py ] && [ "$(left)" -gt 60 ]; then
  status "generation benchmark (quick)"
  timeout $(( $(left) - 15 )) $PY -m benchmarks.bench_generate --quick --out "$OUT/bench" 2>&1 | tail -20
fi

# At most 8 files come back: keep the JSON and logs at the top, pack the rest.
[ -f "$OUT/bench/device-bench.json" ] && cp "$OUT/bench/device-bench.json" "$OUT/"
[ -d "$OUT/bench" ] && tar czf "$OUT/bench-files.tgz" -C "$OUT/bench" . && rm -rf "$OUT/bench"
status "summary (selftest rc=${ST_RC:-skipped}, tests rc=$TEST_RC)"
[ -f "$OUT/device-bench.json" ] && $PY tools/bench_summary.py "$OUT/device-bench.json"
exit 0
