#!/usr/bin/env bash
# The GPU check in one command, for a bare CUDA machine with torch and triton preinstalled and no network:
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results under $OUT (else ./gpu_check_out)
#
# Steps (each bounded by `timeout`, the whole run by CHECK_BUDGET_S, default 470 s < 8 minutes):
#   1. env      nvidia-smi, torch / triton versions, the GPU torch sees (no GPU: fail)
#   2. deps     pytest, pytest-benchmark, hypothesis: used if importable, else installed offline from $FASTLLM_WHEELS
#               (default build/gpu_wheels: prepare it on a machine with network with `--prepare`, then carry it:
#               run(carry=["build/gpu_wheels"]))
#   3. install  pip install --no-build-isolation --no-deps -e . (no network needed). The C++ extension is built only
#               if pybind11, cmake and ninja are importable / on PATH, else FASTLLM_NO_CPP=1 (the GPU path does not
#               use it). If pip cannot install, the checkout runs from PYTHONPATH instead (said in the log).
#   4. tests    every Triton test on CUDA: pytest tests -k triton (test_triton_compile.py excluded: it compiles
#               for sm_80 / sm_90 offline and runs on any machine)
#   5. bench    python -m fastllm bench ops --device cuda --quick: the GPU table (attention forward / backward /
#               decode, GEMM, fused FFN) against torch SDPA / cuBLAS; --json / --csv rows
# $OUT/summary.txt lists each step's status; $OUT/<step>.log its output; $OUT/gpu_table.txt the table.
# Exit status: 0 when every step passed, 1 otherwise (a step that timed out is a failure).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
WHEELS="${FASTLLM_WHEELS:-$ROOT/build/gpu_wheels}"

if [ "${1:-}" = "--prepare" ]; then
    # on a machine with network: the pure-Python wheels of the test runner, for step 2 on the GPU machine
    mkdir -p "$WHEELS"
    # resolved for Python 3.10, the oldest fastllm supports (pure-Python wheels serve any later one too); pip reads
    # the dependency markers for this interpreter, so the backports pytest needs on 3.10 are named
    exec "$PY" -m pip download --only-binary=:all: --python-version 3.10 -d "$WHEELS" pytest pytest-benchmark \
        hypothesis exceptiongroup tomli
fi

OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
BUDGET="${CHECK_BUDGET_S:-470}"
START=$SECONDS
FAILED=0
: > "$OUT/summary.txt"

# step NAME CAP_S CMD...: run CMD under timeout min(CAP_S, what is left of the budget), log to $OUT/NAME.log
step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local t=$((cap < left ? cap : left))
    if [ "$t" -le 5 ]; then
        echo "$name: SKIPPED (the ${BUDGET} s budget is spent)" | tee -a "$OUT/summary.txt"
        FAILED=1
        return 1
    fi
    echo "== $name (at most ${t} s)"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$t" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/$name.log"
    local how="ok"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && how="TIMED OUT"
    [ $rc -ne 0 ] && [ "$how" = "ok" ] && how="FAILED (exit $rc)"
    echo "$name: $how in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || FAILED=1
    return $rc
}

step env 60 bash -c "nvidia-smi; $PY - <<'EOF'
import torch, triton
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)
assert torch.cuda.is_available(), 'torch sees no CUDA device'
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f'cuda:{i}', p.name, f'sm_{p.major}{p.minor}', f'{p.total_memory / 2**30:.0f} GiB', p.multi_processor_count, 'SMs')
EOF" || { echo "no usable GPU: stopping"; exit 1; }

step deps 90 bash -c "
for m in pytest:pytest pytest_benchmark:pytest-benchmark hypothesis:hypothesis; do
    if $PY -c \"import \${m%%:*}\" 2>/dev/null; then echo \"\${m#*:} already installed\"
    else $PY -m pip install --no-index --find-links '$WHEELS' \"\${m#*:}\"; fi
done
$PY -c 'import pytest, pytest_benchmark; print(\"pytest\", pytest.__version__, \"pytest-benchmark\", pytest_benchmark.__version__)'"

step install 180 bash -c "
if $PY -c 'import pybind11' 2>/dev/null && command -v cmake >/dev/null && command -v ninja >/dev/null; then
    echo 'building the C++ extension too'; export FASTLLM_NO_CPP=0
else
    echo 'no pybind11 / cmake / ninja here: FASTLLM_NO_CPP=1 (the GPU path does not use the C++ extension)'
    export FASTLLM_NO_CPP=1
fi
$PY -m pip install --no-build-isolation --no-deps -e . || {
    echo 'pip install failed: running the checkout from PYTHONPATH instead'; exit 0; }"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
step info 60 "$PY" -m fastllm info

# (--continue-on-collection-errors: a test file whose imports are missing here, e.g. hypothesis for test_fuzz.py,
# still fails the step, but the Triton tests of every other file run and are in the log)
step tests 240 "$PY" -m pytest tests -k triton --ignore=tests/test_triton_compile.py -q -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$OUT/tests.xml"

step bench 240 "$PY" -m fastllm bench ops --device cuda --quick --json "$OUT/gpu_rows.json" --csv "$OUT/gpu_rows.csv"
[ -f "$OUT/bench.log" ] && cp "$OUT/bench.log" "$OUT/gpu_table.txt"

echo "total $((SECONDS - START)) s" | tee -a "$OUT/summary.txt"
cat "$OUT/summary.txt"
exit $FAILED
