#!/usr/bin/env bash
# The GPU checks (issue 23) in one call on a lent machine: the device tool's `run` (16 cores, one
# H100/H200, CUDA 13.0, nothing reachable outside it), from the repository root. Everything it
# prints goes to $OUT/gpu_check.log and its files to $OUT/results.tgz; each stage prints its time.
#
# Built here and carried along (git-ignored; `benchmarks/gpu_check.sh pack` makes them):
#   .gpu/libdsv4.so.xz  this library with CUDA: cmake -S . -B build/cuda-export -G Ninja -DDSV4_CUDA=ON
#                     -DCMAKE_CUDA_ARCHITECTURES=90-real -DGGML_NATIVE=OFF -DDSV4_EXPORT_GGML=ON, then
#                     cmake --build build/cuda-export --target dsv4 (ggml-cuda needs ~50 core-minutes:
#                     cheaper here than on the lent machine; xz: the tool carries at most 64 MiB)
#   .gpu/llama-bench.xz  llama.cpp's llama-bench from the same pinned sdist (LLAMA_SRC=its llama.cpp tree),
#                     linked against the ggml inside that library: one ggml-cuda travels, and both
#                     engines run the very same ggml build (optional: skipped if absent)
#   .gpu/golden/      golden files, xz (GOLDEN="ds4-tiny-q8_0 ds4-tiny-f32"; optional: their tests skip)
#   .whl/             cffi, pycparser and gguf wheels for the machine's python3 (3.12)
#
#   benchmarks/gpu_check.sh [pack | test | bench | all]   (default all = test then bench)
#   BENCH_MODELS="wide-q4_k wide4-q4_k bench-q8_0" picks the bench files (make_bench_model.py;
#   wideN: N full-width layers), written there in the background while the tests run;
#   PROFILE=1 adds a DSV4_PROFILE decode run of the first one.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}

if [[ $STAGE == pack ]]; then   # here: gather what the lent machine needs into .gpu/ and .whl/
    set -e
    grep -qx '/.gpu/' .git/info/exclude || echo /.gpu/ >>.git/info/exclude
    grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >>.git/info/exclude
    rm -rf .gpu && mkdir -p .gpu
    BUILD=${BUILD:-build/cuda-export}   # -DDSV4_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90-real -DDSV4_EXPORT_GGML=ON
    strip --strip-unneeded -o /tmp/libdsv4.so "$BUILD/libdsv4.so"
    xz -T0 -9e -c /tmp/libdsv4.so >.gpu/libdsv4.so.xz
    if [[ -n ${LLAMA_SRC:-} ]]; then   # llama.cpp's llama-bench, linked against that library's ggml
        LB=${LLAMA_BUILD:-/tmp/llamacpp-on-dsv4}
        mkdir -p "$LB/ggml-config"
        cat >"$LB/ggml-config/ggml-config.cmake" <<CFG
add_library(ggml::ggml SHARED IMPORTED)
set_target_properties(ggml::ggml PROPERTIES IMPORTED_LOCATION "$PWD/$BUILD/libdsv4.so"
    IMPORTED_SONAME libdsv4.so INTERFACE_INCLUDE_DIRECTORIES "$PWD/vendor/ggml/ggml/include")
CFG
        cmake -S "$LLAMA_SRC" -B "$LB" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_USE_SYSTEM_GGML=ON \
            -Dggml_DIR="$LB/ggml-config" -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
            -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined >/dev/null   # libcuda.so.1: the driver's
        cmake --build "$LB" --target llama-bench -j "$(nproc)"
        strip -o /tmp/llama-bench "$LB/bin/llama-bench"
        xz -T0 -9e -c /tmp/llama-bench >.gpu/llama-bench.xz
    fi
    if [[ -d ../shared/golden && ${GOLDEN:-} != none ]]; then
        mkdir -p .gpu/golden
        cp ../shared/golden/tokens-700.json .gpu/golden/
        for g in ${GOLDEN:-ds4-tiny-q8_0}; do
            for f in ../shared/golden/$g.*; do xz -T0 -9e -c "$f" >".gpu/golden/$(basename "$f").xz"; done
        done
    fi
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
        cffi==2.1.1 pycparser==3.12 gguf==0.19.0
    du -sh .gpu/* .whl
    du -sbc .gpu .whl | tail -1
    exit 0
fi

OUT=${OUT:-/tmp/gpu-out}
W=/tmp/gpu-work   # every result file; $OUT gets the log and one archive of W (the tool returns 8 files)
mkdir -p "$OUT" "$W"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
trap 'tar czf "$OUT/results.tgz" -C "$W" . 2>/dev/null' EXIT
T0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - T0 )) s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
nproc; python3 --version
if ! python3 -c "import cffi, gguf" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
unxz() { python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$@"; }
[[ -f .gpu/libdsv4.so.xz ]] && unxz .gpu/libdsv4.so.xz /tmp/libdsv4.so   # carried compressed (64 MiB limit)
[[ -f .gpu/llama-bench.xz ]] && unxz .gpu/llama-bench.xz /tmp/llama-bench && chmod +x /tmp/llama-bench
mkdir -p /tmp/golden
cp .gpu/golden/*.json /tmp/golden/ 2>/dev/null
for f in .gpu/golden/*.xz; do [[ -f $f ]] && unxz "$f" "/tmp/golden/$(basename "${f%.xz}")"; done
export DSV4_LIBRARY=${DSV4_LIBRARY:-/tmp/libdsv4.so} DSV4_GOLDEN_DIR=/tmp/golden
REPS=${REPS:-2}
python3 -c "
import dsv4_ggml
from dsv4_ggml import _native
from dsv4_ggml.model import BACKENDS
ffi, lib = _native.load()
print('cuda backend available:', bool(lib.dsv4_backend_available(BACKENDS['cuda'])))" || exit 1

MODELS=${MODELS:-/tmp/models}
BENCH_MODELS=${BENCH_MODELS:-wide-q4_k wide4-q4_k bench-q8_0}
if [[ $STAGE == bench || $STAGE == all ]]; then   # the bench files, written while the tests run
    mkdir -p "$MODELS"
    WRITERS=()
    for m in $BENCH_MODELS; do
        kind=${m%%-*} type=${m#*-} opts=()
        [[ $kind == wide* ]] && opts=(--wide --layers "${kind#wide}")
        [[ $kind == wide ]] && opts=(--wide)
        [[ -f $MODELS/dsv4-$m.gguf ]] && continue
        python3 benchmarks/make_bench_model.py "$MODELS" --types "$type" "${opts[@]}" >"$W/make-$m.log" 2>&1 &
        WRITERS+=($!)
    done
    stamp "bench files started"
fi

if [[ $STAGE == test || $STAGE == all ]]; then
    stamp "test: op twins"
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda -rfE 2>&1 | tail -25
    stamp "test: placements, engine, sequences and quantized suites on cuda (log: suite.log, suite.xml)"
    DSV4_TEST_BACKEND=cuda COLUMNS=240 timeout "${SUITE_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
        -n "${TEST_WORKERS:-14}" --tb=line -rfE -o junit_logging=system-out --junitxml="$W/suite.xml" \
        tests/test_cuda.py tests/test_engine.py tests/test_sequences.py tests/test_quant.py >"$W/suite.log" 2>&1
    grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$W/suite.log" | cut -c1-240 | tail -60
    python3 - "$W/suite.xml" <<'PY'   # each test's measured numbers (its printed "worst" lines)
import sys, xml.etree.ElementTree as ET
for tc in ET.parse(sys.argv[1]).iter("testcase"):
    bad = tc.find("failure") is not None or tc.find("error") is not None
    out = tc.findtext("system-out") or ""
    lines = [l.strip() for l in out.splitlines() if "worst" in l or "argmax" in l][:3]
    if bad or lines:
        print(("FAIL " if bad else "ok   ") + tc.get("name")[:70], "|", " / ".join(lines)[:300])
PY
    stamp "test done"
fi

if [[ $STAGE == bench || $STAGE == all ]]; then
    for p in "${WRITERS[@]}"; do wait "$p"; done   # (a plain `wait` would wait for the log's tee too)
    for m in $BENCH_MODELS; do [[ -f $W/make-$m.log ]] && tail -1 "$W/make-$m.log"; done
    stamp "bench: HBM bandwidth"
    nvcc -O3 -arch=sm_90 benchmarks/hbmbw.cu -o /tmp/hbmbw && /tmp/hbmbw 8 | tee "$W/hbmbw.txt"
    BW=$(awk '/^read:/ {print $2}' "$W/hbmbw.txt")
    for m in $BENCH_MODELS; do
        f=$MODELS/dsv4-$m.gguf
        [[ -f $f ]] || { echo "missing $f"; continue; }
        for rep in $(seq "$REPS"); do   # the two engines alternate
            stamp "bench: ours $m run $rep"
            timeout 240 python3 -m dsv4_ggml.cli bench -m "$f" --backend cuda -p 512 -n 128 -r 3 \
                ${BW:+--bandwidth "$BW"} --json >"$W/ours-$m-$rep.json" && python3 -c "
import json, sys; d = json.load(open(sys.argv[1]))
print({k: v for k, v in d.items() if k in ('bandwidth_fraction', 'bandwidth_floor_tokens_per_s', 'graph_nodes', 'graph_splits', 'graph_copies')})" \
                "$W/ours-$m-$rep.json"
            if [[ -x /tmp/llama-bench ]]; then
                stamp "bench: llama.cpp $m run $rep"
                LD_LIBRARY_PATH=$(dirname "$DSV4_LIBRARY") timeout 240 /tmp/llama-bench -m "$f" -ngl 99 \
                    -p 512 -n 128 -r 3 -o md | tee "$W/llamacpp-$m-$rep.md"
            fi
        done
    done
    m=${BENCH_MODELS%% *}
    stamp "bench: ours $m without CUDA graphs (GGML_CUDA_DISABLE_GRAPHS=1)"
    GGML_CUDA_DISABLE_GRAPHS=1 timeout 120 python3 -m dsv4_ggml.cli bench -m "$MODELS/dsv4-$m.gguf" --backend cuda \
        -p 0 -n 128 -r 3 2>&1 | grep -E "tg|graph:"
    if [[ ${PROFILE:-0} == 1 ]]; then
        m=${BENCH_MODELS%% *}
        stamp "profile: decode of $m"
        DSV4_PROFILE=1 timeout 120 python3 -m dsv4_ggml.cli bench -m "$MODELS/dsv4-$m.gguf" --backend cuda \
            -p 0 -n 32 -r 1 >"$W/profile-$m.txt" 2>&1; sed -n '/operands/,$p' "$W/profile-$m.txt" | head -24
    fi
    stamp "bench done"
fi
