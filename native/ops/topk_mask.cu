// CUDA twin of topk_mask_cpu (ops.h): one thread block per query column. The k-th highest finite
// score is found by a radix select over order-preserving 32-bit keys (four 8-bit digits, a
// shared-memory histogram each); scores above it are picked, and among scores equal to it the
// lowest indices, in index order, until k are picked (the CPU's and the reference's tie rule).
#include "ops.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace dsv4::ops {

namespace {

constexpr int kThreads = 256;

// Larger float -> larger key, for every finite value.
__device__ uint32_t order_key(float x) {
    const uint32_t u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void topk_mask_kernel(const char * scores, size_t s_nb1, char * out, size_t o_nb1, int64_t n, int64_t k) {
    const float * s = reinterpret_cast<const float *>(scores + blockIdx.x * s_nb1);
    float * o = reinterpret_cast<float *>(out + blockIdx.x * o_nb1);
    __shared__ uint32_t hist[256];
    __shared__ uint32_t scan[kThreads];
    __shared__ uint32_t prefix, mask, want;   // digits found so far, their bits, picks still owed at the threshold
    __shared__ unsigned long long n_finite;

    if (threadIdx.x == 0) {
        n_finite = 0;
    }
    __syncthreads();
    unsigned long long mine = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        mine += isfinite(s[j]) ? 1 : 0;
    }
    atomicAdd(&n_finite, mine);
    __syncthreads();
    if (n_finite <= (unsigned long long) k) {  // every finite score is picked
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            o[j] = isfinite(s[j]) ? 0.0f : -INFINITY;
        }
        return;
    }

    if (threadIdx.x == 0) {
        prefix = 0;
        mask = 0;
        want = uint32_t(k);
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        hist[threadIdx.x] = 0;  // kThreads == 256 bins
        __syncthreads();
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            if (isfinite(s[j])) {
                const uint32_t key = order_key(s[j]);
                if ((key & mask) == prefix) {
                    atomicAdd(&hist[(key >> shift) & 0xff], 1u);
                }
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {  // the digit of the want-th highest key among those matching the prefix
            uint32_t above = 0;
            int d = 255;
            for (; d > 0 && above + hist[d] < want; --d) {
                above += hist[d];
            }
            want -= above;
            prefix |= uint32_t(d) << shift;
            mask |= 0xffu << shift;
        }
        __syncthreads();
    }
    const uint32_t threshold = prefix;  // the k-th highest key; `want` of the keys equal to it are picked

    // in index order, chunk by chunk: keys above the threshold, and the first `want` equal to it
    uint32_t taken = 0;  // equal keys picked in earlier chunks (the same value in every thread)
    for (int64_t base = 0; base < n; base += blockDim.x) {
        const int64_t j = base + threadIdx.x;
        const bool finite = j < n && isfinite(s[j]);
        const uint32_t key = finite ? order_key(s[j]) : 0;
        const uint32_t equal = finite && key == threshold ? 1u : 0u;
        scan[threadIdx.x] = equal;
        __syncthreads();
        for (int off = 1; off < kThreads; off <<= 1) {  // inclusive scan (Hillis-Steele)
            const uint32_t add = threadIdx.x >= off ? scan[threadIdx.x - off] : 0u;
            __syncthreads();
            scan[threadIdx.x] += add;
            __syncthreads();
        }
        const uint32_t rank = taken + scan[threadIdx.x] - equal;  // equal keys before this one
        if (j < n) {
            const bool picked = finite && (key > threshold || (equal && rank < want));
            o[j] = picked ? 0.0f : -INFINITY;
        }
        taken += scan[kThreads - 1];
        __syncthreads();
    }
}

}  // namespace

void topk_mask_cuda(ggml_tensor * dst, void * stream) {
    const ggml_tensor * scores = dst->src[0];
    const int64_t n = scores->ne[0], T = scores->ne[1];
    if (n == 0 || T == 0) {
        return;
    }
    topk_mask_kernel<<<unsigned(T), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const char *>(scores->data), scores->nb[1], static_cast<char *>(dst->data), dst->nb[1], n,
        dst->op_params[kParamSlot]);
}

}  // namespace dsv4::ops
