// CUDA twin of attend_decode_cpu (ops.h): one thread block per (head, query). Its warps take the keys in
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
// Per query g the masks and picks advance by their row strides, the bases come from `bases`.
struct DevPart {
    const char * rows;
    size_t nb1;
    int type;
    int64_t n_rows;
    const int32_t * idx;  // nullptr: rows base … base + n − 1
    size_t idx_nb1;
    const float * mask;
    size_t mask_nb1;
    int64_t n;
    int base_col;         // column of `bases` holding the first row; −1: the query's own row g
};

__global__ void attend_decode_kernel(const char * q, size_t q_nb1, size_t q_nb2, const float * sinks, const int32_t * bases,
                                     size_t bases_nb1, DevPart p0, DevPart p1, DevPart p2, float scale, char * out,
                                     size_t o_nb1, size_t o_nb2, int64_t Dh) {
    extern __shared__ float shared[];  // kWarps × Dh weighted sums, then kWarps maxima and sums
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t h = blockIdx.x, g = blockIdx.y;
    const int32_t * base = reinterpret_cast<const int32_t *>(reinterpret_cast<const char *>(bases) + g * bases_nb1);
    float * acc = shared + warp * Dh;
    float * wm = shared + kWarps * Dh;
    float * wl = wm + kWarps;
    const float * qh = reinterpret_cast<const float *>(q + h * q_nb1 + g * q_nb2);
    for (int64_t d = lane; d < Dh; d += 32) {
        acc[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const int64_t total = p0.n + p1.n + p2.n;
    for (int64_t j = warp; j < total; j += kWarps) {
        const DevPart & p = j < p0.n ? p0 : j < p0.n + p1.n ? p1 : p2;
        const int64_t jj = j < p0.n ? j : j < p0.n + p1.n ? j - p0.n : j - p0.n - p1.n;
        const float mv = reinterpret_cast<const float *>(reinterpret_cast<const char *>(p.mask) + g * p.mask_nb1)[jj];
        const int32_t * idx =
            p.idx != nullptr ? reinterpret_cast<const int32_t *>(reinterpret_cast<const char *>(p.idx) + g * p.idx_nb1) : nullptr;
        const int64_t r = (p.base_col < 0 ? g : int64_t(base[p.base_col])) + (idx != nullptr ? int64_t(idx[jj]) : jj);
        if (mv == -INFINITY || (idx != nullptr && idx[jj] < 0) || r < 0 || r >= p.n_rows) {
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
    float * o = reinterpret_cast<float *>(out + h * o_nb1 + g * o_nb2);
    for (int64_t d = threadIdx.x; d < Dh; d += blockDim.x) {
        float num = 0.0f;
        for (int w = 0; w < kWarps; ++w) {
            num += shared[w * Dh + d] * f[w];
        }
        o[d] = num / denom;
    }
}

DevPart dev_part(const ggml_tensor * rows, const ggml_tensor * idx, const ggml_tensor * mask, size_t mask_offset, int64_t n,
                 int base_col) {
    GGML_ASSERT(row_type_supported(rows->type));
    return {static_cast<const char *>(rows->data),
            rows->nb[1],
            int(rows->type),
            rows->ne[1],
            idx != nullptr ? static_cast<const int32_t *>(idx->data) : nullptr,
            idx != nullptr ? idx->nb[1] : 0,
            reinterpret_cast<const float *>(static_cast<const char *>(mask->data) + mask_offset),
            mask->nb[1],
            n,
            base_col};
}

}  // namespace

void attend_decode_cuda(ggml_tensor * dst, void * stream) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * ring = dst->src[2];
    const ggml_tensor * ring_mask = dst->src[4];
    const ggml_tensor * bases = dst->src[5];
    const int64_t Dh = q->ne[0], H = q->ne[1], G = q->ne[2];
    float scale;
    int32_t cache_col;
    std::memcpy(&scale, reinterpret_cast<const char *>(dst->op_params) + kParamSlot * sizeof(int32_t), sizeof(float));
    std::memcpy(&cache_col, reinterpret_cast<const char *>(dst->op_params) + (kParamSlot + 1) * sizeof(int32_t),
                sizeof(int32_t));
    const int64_t n_ring = ring_mask->ne[0] - 1;
    const DevPart p0 = dev_part(ring, nullptr, ring_mask, 0, n_ring, 0);
    const DevPart p1 = dev_part(dst->src[3], nullptr, ring_mask, size_t(n_ring) * sizeof(float), 1, -1);
    DevPart p2 = {nullptr, 0, int(GGML_TYPE_F32), 0, nullptr, 0, nullptr, 0, 0, 0};
    if (dst->src[6] != nullptr) {
        p2 = dev_part(dst->src[6], dst->src[8], dst->src[7], 0, dst->src[7]->ne[0], cache_col);
    }
    GGML_ASSERT(G <= 65535);  // queries on the grid's y axis
    const size_t shared = (size_t(kWarps) * size_t(Dh) + 2 * kWarps) * sizeof(float);
    attend_decode_kernel<<<dim3(unsigned(H), unsigned(G)), kWarps * 32, shared, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const char *>(q->data), q->nb[1], q->nb[2], static_cast<const float *>(dst->src[1]->data),
        static_cast<const int32_t *>(bases->data), bases->nb[1], p0, p1, p2, scale, static_cast<char *>(dst->data),
        dst->nb[1], dst->nb[2], Dh);
}

}  // namespace dsv4::ops
