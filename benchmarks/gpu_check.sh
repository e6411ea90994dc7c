#!/usr/bin/env bash
# The GPU checks of issue 8 in one call on a lent machine (`run` of the device tool, 16 cores,
# one H100/H200), from the repository root. Writes everything under $OUT (default /tmp/gpu-out).
#   stage build : venv, ggml + libdsv4 with CUDA for sm_90 (timed)
#   stage test  : tests/test_ops.py (our fused ops' CUDA twins vs the reference), then
#                 tests/test_engine.py on backend cuda (tiny models and golden, same 1e-4 bound)
#   stage bench : HBM bandwidth (benchmarks/hbmbw.cu), the full-width stack (make_bench_model.py
#                 --wide), `dsv4-ggml bench --backend cuda`, then llama.cpp CUDA (llama-bench
#                 from the same pinned sdist, outside the repo) on the same file
#   benchmarks/gpu_check.sh [build|test|bench|all]
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
OUT=${OUT:-/tmp/gpu-out}
J=${J:-$(nproc)}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

if [[ $STAGE == build || $STAGE == all ]]; then
    [[ -d .venv-gpu ]] || python3 -m venv .venv-gpu
    . .venv-gpu/bin/activate
    pip install -q numpy gguf jinja2 cffi tokenizers pytest cmake ninja
    start=$(date +%s)
    cmake -S . -B build/cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DDSV4_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90
    cmake --build build/cuda --target dsv4 -j "$J"
    echo "build: ggml-cuda + libdsv4 in $(( $(date +%s) - start )) s on $J cores"
fi
. .venv-gpu/bin/activate
export DSV4_LIBRARY=$PWD/build/cuda/libdsv4.so PYTHONPATH=$PWD

if [[ $STAGE == test || $STAGE == all ]]; then
    python -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda \
        --junitxml="$OUT/test_ops_cuda.xml" || echo "test: op FAILURES (see above)"
    DSV4_TEST_BACKEND=cuda python -m pytest -q -p no:cacheprovider tests/test_engine.py -k "reference or golden" \
        --junitxml="$OUT/test_engine_cuda.xml" || echo "test: FAILURES (see above)"
fi

if [[ $STAGE == bench || $STAGE == all ]]; then
    nvcc -O3 -arch=sm_90 benchmarks/hbmbw.cu -o "$OUT/hbmbw" && "$OUT/hbmbw" 8 | tee "$OUT/hbmbw.txt"
    BW=$(awk '/^read:/ {print $2}' "$OUT/hbmbw.txt")
    MODELS=${MODELS:-/tmp/wide-models}
    [[ -f $MODELS/dsv4-wide-q4_k.gguf ]] || python benchmarks/make_bench_model.py "$MODELS" --types q4_k --wide
    python -m dsv4_ggml.cli bench -m "$MODELS/dsv4-wide-q4_k.gguf" --backend cuda -p 512 -n 128 -r 3 \
        --bandwidth "$BW" --json | tee "$OUT/ours_cuda.json"
    LB=${LLAMA_BUILD:-/tmp/llamacpp-cuda}
    if [[ ! -x $LB/bin/llama-bench ]]; then
        mkdir -p "$LB/src"
        python vendor/ggml/fetch_ggml.py >/dev/null
        SDIST=$(ls vendor/ggml/.download/*.tar.gz | head -1)
        tar -xzf "$SDIST" -C "$LB/src" --strip-components=3 --wildcards '*/vendor/llama.cpp/*'
        cmake -S "$LB/src" -B "$LB" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
            -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
        cmake --build "$LB" --target llama-bench -j "$J"
    fi
    "$LB/bin/llama-bench" -m "$MODELS/dsv4-wide-q4_k.gguf" -ngl 99 -p 512 -n 128 -r 3 -o json | tee "$OUT/llamacpp_cuda.json"
fi
