#!/usr/bin/env bash
# Issue 15: fastllm._C under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   scripts/sanitize.sh                 # build with FASTLLM_SANITIZE=address,undefined, run the C++-path tests
#   scripts/sanitize.sh tests/test_gemm.py -k avx2    # other pytest arguments instead of the default set
#
# The checking build goes to its own folder ($FASTLLM_SANITIZE_DIR, default /tmp/fastllm-sanitize): the in-place
# build of the checkout is left alone. Python is not built with ASan, so the runtime is preloaded (LD_PRELOAD);
# leak checking is off (CPython and torch keep memory to exit); UBSan findings abort, so a finding fails the test
# that hit it. Exit status: pytest's (0 = every test passed with no finding).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
WORK=${FASTLLM_SANITIZE_DIR:-/tmp/fastllm-sanitize}
SAN=${FASTLLM_SANITIZE:-address,undefined}

rm -rf "$WORK"
mkdir -p "$WORK"
(cd "$ROOT" && FASTLLM_SANITIZE=$SAN "$PY" setup.py -q build --build-base "$WORK/build" --build-lib "$WORK/lib")

libs=""
for lib in libasan.so libubsan.so; do
  case ",$SAN," in
    *,address,*) [ "$lib" = libasan.so ] && libs="$libs $(${CXX:-g++} -print-file-name=$lib)" ;;
  esac
  case ",$SAN," in
    *,undefined,*) [ "$lib" = libubsan.so ] && libs="$libs $(${CXX:-g++} -print-file-name=$lib)" ;;
  esac
done
export LD_PRELOAD="${libs# }"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export PYTHONPATH="$WORK/lib"
cd "$WORK"  # not the checkout: its fastllm/ (with the in-place build) must not shadow the checking build
"$PY" - <<'PY'
import fastllm, fastllm._C as C
assert "/lib/fastllm/" in C.__file__, f"not the checking build: {C.__file__}"
print("fastllm._C (sanitized):", C.__file__, "| isa", C.isa())
PY

if [ $# -eq 0 ]; then
  set -- "$ROOT/tests/test_gemm.py" "$ROOT/tests/test_qkv.py" "$ROOT/tests/test_int8.py" \
    "$ROOT/tests/test_layer_norm.py" "$ROOT/tests/test_rope.py" "$ROOT/tests/test_attention.py" \
    "$ROOT/tests/test_attention_decode.py" "$ROOT/tests/test_attention_nonfinite.py" "$ROOT/tests/test_nonfinite.py" \
    "$ROOT/tests/test_threads.py" "$ROOT/tests/test_program.py" "$ROOT/tests/test_direct.py" -k "not triton"
fi
exec "$PY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" "$@"
