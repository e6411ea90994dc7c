#!/usr/bin/env bash
# The sanitizer job: builds libdsv4 (and ggml) with AddressSanitizer + UndefinedBehaviorSanitizer
# into build/asan, then runs the golden tests, the loader tests, the hostile corpus, a bounded
# fuzzing run, the engine, reliability and quantization tests against it. Any ASan/UBSan report
# aborts the process, so it fails the test that triggered it.
#   tests/sanitized.sh [extra pytest args]      (from the repository root, in the dev venv)
# Environment: DSV4_FUZZ_SECONDS (default 60), BUILD_DIR (default build/asan).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build/asan}
cmake -S . -B "$BUILD_DIR" -G Ninja -DDSV4_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD_DIR" --target dsv4
export DSV4_LIBRARY="$PWD/$BUILD_DIR/libdsv4.so"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the interpreter is not instrumented: the runtimes must come first; Python's own allocations
# are not leaks of ours; a huge allocation must fail (OutOfMemoryError) rather than abort
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# ASan's shadow memory needs terabytes of address space: no RLIMIT_AS / RLIMIT_DATA in children
export DSV4_HOSTILE_MEM_MB=0 DSV4_HOSTILE_AS_MB=0 DSV4_FUZZ_DATA_MB=0
export DSV4_FUZZ_SECONDS=${DSV4_FUZZ_SECONDS:-60}
exec python -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_loader.py tests/test_hostile.py \
    tests/test_reliability.py tests/test_quant.py "$@"
