// CUDA twin of attend_decode_cpu (ops.h): one thread block per head. Its warps take the keys in
// turn; each warp reduces its dot products by shuffles and keeps its own online softmax (maximum,
// sum, and the weighted sum of its keys in shared memory); the block then merges the warps' parts
// with the head's sink. Keys the mask hides are not read.
#include "ops.h"
#include "rows.cuh"

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace dsv4::ops {

namespace {

constexpr int kWarps = 4;

// A source of keys (see Part in attend_decode.cpp).
struct DevPart {
    const char * rows;
    size_t nb1;
    int type;
    int64_t n_rows;
    const int32_t * idx;  // nullptr: rows 0 … n−1
    const float * mask;
    int64_t n;
};

__global__ void attend_decode_kernel(const char * q, size_t q_nb1, const float * sinks, DevPart p0, DevPart p1, DevPart p2,
                                     float scale, char * out, size_t o_nb1, int64_t Dh) {
    extern __shared__ float shared[];  // kWarps × Dh weighted sums, then kWarps maxima and sums
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t h = blockIdx.x;
    float * acc = shared + warp * Dh;
    float * wm = shared + kWarps * Dh;
    float * wl = wm + kWarps;
    const float * qh = reinterpret_cast<const float *>(q + h * q_nb1);
    for (int64_t d = lane; d < Dh; d += 32) {
        acc[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const int64_t total = p0.n + p1.n + p2.n;
    for (int64_t j = warp; j < total; j += kWarps) {
        const DevPart & p = j < p0.n ? p0 : j < p0.n + p1.n ? p1 : p2;
        const int64_t jj = j < p0.n ? j : j < p0.n + p1.n ? j - p0.n : j - p0.n - p1.n;
        const float mv = p.mask[jj];
        const int64_t r = p.idx != nullptr ? p.idx[jj] : jj;
        if (mv == -INFINITY || r < 0 || r >= p.n_rows) {
            continue;  // the same for every lane of the warp
        }
        const char * row = p.rows + r * p.nb1;
        float dot = 0.0f;
        for (int64_t d = lane; d < Dh; d += 32) {
            dot += qh[d] * row_value(row, p.type, d);
        }
        for (int off = 16; off > 0; off >>= 1) {
            dot += __shfl_xor_sync(0xffffffffu, dot, off);
        }
        const float s = scale * dot + mv;
        const float mx = fmaxf(m, s);
        const float corr = expf(m - mx);  // 0 while m is −inf
        const float pr = expf(s - mx);
        l = l * corr + pr;
        for (int64_t d = lane; d < Dh; d += 32) {
            acc[d] = acc[d] * corr + pr * row_value(row, p.type, d);
        }
        m = mx;
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
    __syncthreads();
    const float sink = sinks[h];
    float mx = sink;
    for (int w = 0; w < kWarps; ++w) {
        mx = fmaxf(mx, wm[w]);
    }
    float denom = expf(sink - mx);
    float f[kWarps];
    for (int w = 0; w < kWarps; ++w) {
        f[w] = expf(wm[w] - mx);  // 0 for a warp that saw no key
        denom += wl[w] * f[w];
    }
    float * o = reinterpret_cast<float *>(out + h * o_nb1);
    for (int64_t d = threadIdx.x; d < Dh; d += blockDim.x) {
        float num = 0.0f;
        for (int w = 0; w < kWarps; ++w) {
            num += shared[w * Dh + d] * f[w];
        }
        o[d] = num / denom;
    }
}

DevPart dev_part(const ggml_tensor * rows, const ggml_tensor * idx, const float * mask, int64_t n) {
    GGML_ASSERT(row_type_supported(rows->type));
    return {static_cast<const char *>(rows->data), rows->nb[1], int(rows->type), rows->ne[1],
            idx != nullptr ? static_cast<const int32_t *>(idx->data) : nullptr, mask, n};
}

}  // namespace

void attend_decode_cuda(ggml_tensor * dst, void * stream) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * ring = dst->src[2];
    const int64_t Dh = q->ne[0], H = q->ne[1];
    float scale;
    std::memcpy(&scale, reinterpret_cast<const char *>(dst->op_params) + kParamSlot * sizeof(int32_t), sizeof(float));
    const float * ring_mask = static_cast<const float *>(dst->src[4]->data);
    const DevPart p0 = dev_part(ring, nullptr, ring_mask, ring->ne[1]);
    const DevPart p1 = dev_part(dst->src[3], nullptr, ring_mask + ring->ne[1], 1);
    DevPart p2 = {nullptr, 0, int(GGML_TYPE_F32), 0, nullptr, nullptr, 0};
    if (dst->src[5] != nullptr) {
        const ggml_tensor * idx = dst->src[7];
        p2 = dev_part(dst->src[5], idx, static_cast<const float *>(dst->src[6]->data),
                      idx != nullptr ? ggml_nelements(idx) : dst->src[5]->ne[1]);
    }
    const size_t shared = (size_t(kWarps) * size_t(Dh) + 2 * kWarps) * sizeof(float);
    attend_decode_kernel<<<unsigned(H), kWarps * 32, shared, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const char *>(q->data), q->nb[1], static_cast<const float *>(dst->src[1]->data), p0, p1, p2, scale,
        static_cast<char *>(dst->data), dst->nb[1], Dh);
}

}  // namespace dsv4::ops
