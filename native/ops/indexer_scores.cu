// CUDA twin of indexer_scores_cpu (ops.h): one warp per (query, key), the key row counted from
// the query's base row. The warp stages the key row
// (converted to float) in shared memory; for each head its lanes split the dot product over the
// dimensions and reduce it by shuffles, and lane 0 accumulates w_h·max(0, dot). Keys the mask
// hides are not computed.
#include "ops.h"
#include "rows.cuh"

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dsv4::ops {

namespace {

constexpr int kWarps = 4;  // warps (keys in flight) per thread block

__global__ void indexer_scores_kernel(const char * q, size_t q_nb1, size_t q_nb2, const char * k, size_t k_nb1, int k_type,
                                      const char * w, size_t w_nb0, size_t w_nb1, const char * m, size_t m_nb0,
                                      size_t m_nb1, bool m_f16, const int32_t * base, int64_t k_rows, char * out,
                                      size_t o_nb1, int64_t Dh, int64_t H, int64_t n) {
    extern __shared__ float key_rows[];  // kWarps × Dh
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t t = blockIdx.y;
    float * ks = key_rows + warp * Dh;
    float * o = reinterpret_cast<float *>(out + t * o_nb1);
    const int64_t row0 = base != nullptr ? base[t] : 0;  // the query's first key row
    for (int64_t j = int64_t(blockIdx.x) * kWarps + warp; j < n; j += int64_t(gridDim.x) * kWarps) {
        const char * mp = m + t * m_nb1 + j * m_nb0;
        const float mv = m_f16 ? __half2float(*reinterpret_cast<const __half *>(mp)) : *reinterpret_cast<const float *>(mp);
        float score = -INFINITY;
        if (mv != -INFINITY && row0 + j >= 0 && row0 + j < k_rows) {
            const char * row = k + (row0 + j) * k_nb1;
            for (int64_t d = lane; d < Dh; d += 32) {
                ks[d] = row_value(row, k_type, d);
            }
            __syncwarp();
            score = 0.0f;
            for (int64_t h = 0; h < H; ++h) {
                const float * qh = reinterpret_cast<const float *>(q + h * q_nb1 + t * q_nb2);
                float dot = 0.0f;
                for (int64_t d = lane; d < Dh; d += 32) {
                    dot += qh[d] * ks[d];
                }
                for (int off = 16; off > 0; off >>= 1) {
                    dot += __shfl_xor_sync(0xffffffffu, dot, off);
                }
                score += fmaxf(dot, 0.0f) * *reinterpret_cast<const float *>(w + h * w_nb0 + t * w_nb1);
            }
            __syncwarp();
            score += mv;
        }
        if (lane == 0) {
            o[j] = score;
        }
    }
}

}  // namespace

void indexer_scores_cuda(ggml_tensor * dst, void * stream) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * w = dst->src[2];
    const ggml_tensor * m = dst->src[3];
    const int32_t * base = dst->src[4] != nullptr ? static_cast<const int32_t *>(dst->src[4]->data) : nullptr;
    const int64_t Dh = q->ne[0], H = q->ne[1], T = q->ne[2], n = m->ne[0];
    if (n == 0 || T == 0) {
        return;
    }
    GGML_ASSERT(row_type_supported(k->type));
    GGML_ASSERT(T <= 65535);  // queries on the grid's y axis (a micro-batch is far smaller)
    const int64_t blocks = (n + kWarps - 1) / kWarps;
    const dim3 grid(unsigned(blocks < 65535 ? blocks : 65535), unsigned(T));
    const size_t shared = size_t(kWarps) * size_t(Dh) * sizeof(float);
    indexer_scores_kernel<<<grid, kWarps * 32, shared, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const char *>(q->data), q->nb[1], q->nb[2], static_cast<const char *>(k->data), k->nb[1],
        int(k->type), static_cast<const char *>(w->data), w->nb[0], w->nb[1], static_cast<const char *>(m->data),
        m->nb[0], m->nb[1], m->type == GGML_TYPE_F16, base, k->ne[1], static_cast<char *>(dst->data), dst->nb[1], Dh,
        H, n);
}

}  // namespace dsv4::ops
