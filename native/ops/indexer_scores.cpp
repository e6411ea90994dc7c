#include "ops.h"
#include "cpu_rows.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace dsv4::ops {

namespace {

// 16 floats in one vector (GCC/Clang vector extension: one zmm register with AVX-512, two ymm or
// four xmm otherwise).
using v16 = float __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr int64_t kKeys = 8;     // keys whose dot products with 16 heads are accumulated together
constexpr int64_t kChunk = 64;   // keys per work item

float mask_value(const ggml_tensor * m, int64_t j, int64_t t) {
    const char * p = static_cast<const char *>(m->data) + t * m->nb[1] + j * m->nb[0];
    return m->type == GGML_TYPE_F16 ? ggml_fp16_to_fp32(*reinterpret_cast<const ggml_fp16_t *>(p))
                                    : *reinterpret_cast<const float *>(p);
}

}  // namespace

ggml_tensor * indexer_scores(ggml_context * ctx, ggml_tensor * q, ggml_tensor * keys, ggml_tensor * w, ggml_tensor * mask,
                             ggml_tensor * base) {
    const int64_t Dh = q->ne[0], H = q->ne[1], T = q->ne[2], n = mask->ne[0];
    GGML_ASSERT(q->type == GGML_TYPE_F32 && w->type == GGML_TYPE_F32 && q->nb[0] == sizeof(float) && q->ne[3] == 1);
    GGML_ASSERT(keys->ne[0] == Dh && keys->ne[2] == 1 && keys->ne[3] == 1 && ggml_is_contiguous_rows(keys) &&
                rows_convertible(keys));
    GGML_ASSERT(w->ne[0] == H && w->ne[1] == T && w->nb[0] == sizeof(float));
    GGML_ASSERT((mask->type == GGML_TYPE_F16 || mask->type == GGML_TYPE_F32) && mask->ne[1] == T);
    GGML_ASSERT(base != nullptr || n <= keys->ne[1]);
    GGML_ASSERT(base == nullptr || (base->type == GGML_TYPE_I32 && ggml_nelements(base) == T && ggml_is_contiguous(base)));
    ggml_tensor * args[] = {q, keys, w, mask, base};
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, n, T, 1, 1, args, base != nullptr ? 5 : 4, indexer_scores_cpu,
                                       GGML_N_TASKS_MAX, nullptr);
    ggml_format_name(out, "indexer_scores");
    return out;
}

void indexer_scores_cpu(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * w = dst->src[2];
    const ggml_tensor * m = dst->src[3];
    const int32_t * base = dst->src[4] != nullptr ? static_cast<const int32_t *>(dst->src[4]->data) : nullptr;
    const int64_t Dh = q->ne[0], H = q->ne[1], T = q->ne[2], n = m->ne[0];
    const int64_t Hp = (H + kLanes - 1) / kLanes * kLanes;
    // work items: (query, chunk of kChunk keys), a contiguous range per thread
    const int64_t n_chunks = (n + kChunk - 1) / kChunk;
    const int64_t items = T * n_chunks;
    const auto [i0, i1] = thread_share(items, ith, nth);

    // the query's heads transposed, qt[d·Hp + h] = q[d, h] (heads padded with zeros to a multiple
    // of 16), so that each key element is broadcast against 16 heads at once; the keys as floats
    thread_local std::vector<float> qt, wt, kf;
    qt.resize(size_t(Dh * Hp));
    wt.resize(size_t(Hp));
    kf.resize(size_t(kKeys * Dh));
    int64_t t_loaded = -1;
    for (int64_t item = i0; item < i1; ++item) {
        const int64_t t = item / n_chunks, j0 = item % n_chunks * kChunk, j1 = std::min(n, j0 + kChunk);
        if (t != t_loaded) {
            std::fill(qt.begin(), qt.end(), 0.0f);
            std::fill(wt.begin(), wt.end(), 0.0f);
            for (int64_t h = 0; h < H; ++h) {
                const float * qh = reinterpret_cast<const float *>(static_cast<const char *>(q->data) + h * q->nb[1] + t * q->nb[2]);
                for (int64_t d = 0; d < Dh; ++d) {
                    qt[size_t(d * Hp + h)] = qh[d];
                }
                wt[size_t(h)] = *reinterpret_cast<const float *>(static_cast<const char *>(w->data) + h * w->nb[0] + t * w->nb[1]);
            }
            t_loaded = t;
        }
        float * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + t * dst->nb[1]);
        const int64_t row0 = base != nullptr ? base[t] : 0;  // the query's first key row
        for (int64_t jb = j0; jb < j1; jb += kKeys) {
            const int64_t nk = std::min(kKeys, j1 - jb);
            float mv[kKeys];
            bool any = false;
            for (int64_t r = 0; r < nk; ++r) {
                mv[r] = mask_value(m, jb + r, t);
                any = any || mv[r] != -std::numeric_limits<float>::infinity();
            }
            if (!any) {  // hidden from this query (causal): no dot products
                for (int64_t r = 0; r < nk; ++r) {
                    out[jb + r] = -std::numeric_limits<float>::infinity();
                }
                continue;
            }
            for (int64_t r = 0; r < kKeys; ++r) {
                float * dstk = kf.data() + r * Dh;
                if (r >= nk || mv[r] == -std::numeric_limits<float>::infinity() || row0 + jb + r < 0 ||
                    row0 + jb + r >= k->ne[1]) {  // hidden, or not a row: its score is −inf below
                    std::fill(dstk, dstk + Dh, 0.0f);
                    continue;
                }
                row_to_float(k, row0 + jb + r, dstk);  // the key row as floats
            }
            float score[kKeys] = {};
            for (int64_t hc = 0; hc < Hp; hc += kLanes) {
                v16 acc[kKeys] = {};
                const float * qd = qt.data() + hc;
                for (int64_t d = 0; d < Dh; ++d, qd += Hp) {
                    v16 qv;
                    std::memcpy(&qv, qd, sizeof(qv));
                    for (int64_t r = 0; r < kKeys; ++r) {
                        acc[r] += kf[size_t(r * Dh + d)] * qv;
                    }
                }
                v16 wv;
                std::memcpy(&wv, wt.data() + hc, sizeof(wv));
                const v16 zero = {};
                for (int64_t r = 0; r < kKeys; ++r) {
                    const v16 s = (acc[r] > zero ? acc[r] : zero) * wv;  // ReLU, then the head weights
                    for (int l = 0; l < kLanes; ++l) {
                        score[r] += s[l];
                    }
                }
            }
            for (int64_t r = 0; r < nk; ++r) {
                const bool row = row0 + jb + r >= 0 && row0 + jb + r < k->ne[1];
                out[jb + r] = row ? score[r] + mv[r] : -std::numeric_limits<float>::infinity();
            }
        }
    }
}

}  // namespace dsv4::ops
