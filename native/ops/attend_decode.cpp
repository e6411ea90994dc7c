#include "ops.h"
#include "cpu_rows.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace dsv4::ops {

namespace {

using v16 = float __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr int kKeys = 8;  // keys converted, scored and accumulated together

// A source of keys: rows of `rows` (any type with a float conversion), rows base … base + n − 1
// or base + idx[j], with one additive mask value per key.
struct Part {
    const ggml_tensor * rows;
    const int32_t * idx;       // n values, or nullptr
    const float * mask;        // n values
    int64_t n;
    int64_t base;
};

using v8 = float __attribute__((vector_size(32)));
using v4 = float __attribute__((vector_size(16)));

// the sum of a vector's lanes, as a tree (a chain of 15 dependent adds would cost more than the
// dot product it ends)
float hsum(v16 v) {
    const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

// a·b over n vectors, in four independent sums (the keys of a block overlap in the core)
float dot(const v16 * a, const v16 * b, int64_t n) {
    v16 s0{}, s1{}, s2{}, s3{};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; ++i) {
        s0 += a[i] * b[i];
    }
    return hsum((s0 + s1) + (s2 + s3));
}

}  // namespace

ggml_tensor * attend_decode(ggml_context * ctx, ggml_tensor * q, ggml_tensor * sinks, float scale, ggml_tensor * ring,
                            ggml_tensor * fresh, ggml_tensor * ring_mask, ggml_tensor * bases, int cache_col,
                            ggml_tensor * cache, ggml_tensor * cache_mask, ggml_tensor * cache_idx) {
    const int64_t Dh = q->ne[0], H = q->ne[1], G = q->ne[2];
    GGML_ASSERT(q->type == GGML_TYPE_F32 && ggml_is_contiguous(q) && q->ne[3] == 1);
    GGML_ASSERT(sinks->type == GGML_TYPE_F32 && ggml_nelements(sinks) == H && ggml_is_contiguous(sinks));
    auto check_rows = [&](const ggml_tensor * t) {
        GGML_ASSERT(t->ne[0] == Dh && t->ne[2] == 1 && t->ne[3] == 1 && ggml_is_contiguous_rows(t) && rows_convertible(t));
    };
    auto check_per_query = [&](const ggml_tensor * m, ggml_type type) {
        GGML_ASSERT(m->type == type && m->ne[1] == G && m->ne[2] == 1 && m->ne[3] == 1 && m->nb[0] == ggml_type_size(type));
    };
    check_rows(ring);
    check_rows(fresh);
    GGML_ASSERT(fresh->type == GGML_TYPE_F32 && fresh->ne[1] == G);
    check_per_query(ring_mask, GGML_TYPE_F32);
    GGML_ASSERT(ring_mask->ne[0] >= 1 && ring_mask->ne[0] - 1 <= ring->ne[1]);
    check_per_query(bases, GGML_TYPE_I32);
    GGML_ASSERT(cache_col >= 1 && cache_col < bases->ne[0]);
    ggml_tensor * args[9] = {q, sinks, ring, fresh, ring_mask, bases};
    int n_args = 6;
    if (cache != nullptr) {
        check_rows(cache);
        check_per_query(cache_mask, GGML_TYPE_F32);
        GGML_ASSERT(cache_idx == nullptr || cache_idx->ne[0] == cache_mask->ne[0]);
        args[n_args++] = cache;
        args[n_args++] = cache_mask;
        if (cache_idx != nullptr) {
            check_per_query(cache_idx, GGML_TYPE_I32);
            args[n_args++] = cache_idx;
        }
    }
    ggml_tensor * out =
        ggml_custom_4d(ctx, GGML_TYPE_F32, Dh, H, G, 1, args, n_args, attend_decode_cpu, GGML_N_TASKS_MAX, nullptr);
    std::memcpy(reinterpret_cast<char *>(out->op_params) + kParamSlot * sizeof(int32_t), &scale, sizeof(float));
    std::memcpy(reinterpret_cast<char *>(out->op_params) + (kParamSlot + 1) * sizeof(int32_t), &cache_col, sizeof(int32_t));
    ggml_format_name(out, "attend_decode");
    return out;
}

void attend_decode_cpu(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * sinks = dst->src[1];
    const ggml_tensor * ring = dst->src[2];
    const ggml_tensor * fresh = dst->src[3];
    const ggml_tensor * ring_mask = dst->src[4];
    const ggml_tensor * bases = dst->src[5];
    const ggml_tensor * cache = dst->src[6];
    const ggml_tensor * cache_mask = dst->src[7];
    const ggml_tensor * cache_idx = dst->src[8];
    const int64_t Dh = q->ne[0], H = q->ne[1], G = q->ne[2];
    float scale;
    int32_t cache_col;
    std::memcpy(&scale, reinterpret_cast<const char *>(dst->op_params) + kParamSlot * sizeof(int32_t), sizeof(float));
    std::memcpy(&cache_col, reinterpret_cast<const char *>(dst->op_params) + (kParamSlot + 1) * sizeof(int32_t),
                sizeof(int32_t));
    const int64_t n_ring = ring_mask->ne[0] - 1;
    const int64_t Dv = (Dh + kLanes - 1) / kLanes;  // vectors per row (rows padded with zeros)
    const float neg_inf = -std::numeric_limits<float>::infinity();
    thread_local std::vector<v16> qv, acc, kv;
    thread_local std::vector<float> m, l;
    kv.assign(size_t(kKeys * Dv), v16{});

    // (query, head) pairs split over the threads; each thread reads every key of a query once for
    // all of its heads of that query
    const auto [w0, w1] = thread_share(G * H, ith, nth);
    for (int64_t g = w0 / H; g < G && g * H < w1; ++g) {
        const int64_t h0 = std::max(w0, g * H) - g * H, h1 = std::min(w1, (g + 1) * H) - g * H;
        if (h0 >= h1) {
            continue;
        }
        const int32_t * base = reinterpret_cast<const int32_t *>(static_cast<const char *>(bases->data) + g * bases->nb[1]);
        const float * rmask = reinterpret_cast<const float *>(static_cast<const char *>(ring_mask->data) + g * ring_mask->nb[1]);
        Part parts[3] = {
            {ring, nullptr, rmask, n_ring, base[0]},
            {fresh, nullptr, rmask + n_ring, 1, g},
            {nullptr, nullptr, nullptr, 0, 0},
        };
        int n_parts = 2;
        if (cache != nullptr) {
            parts[n_parts++] = {cache,
                                cache_idx != nullptr ? reinterpret_cast<const int32_t *>(
                                                           static_cast<const char *>(cache_idx->data) + g * cache_idx->nb[1])
                                                     : nullptr,
                                reinterpret_cast<const float *>(static_cast<const char *>(cache_mask->data) + g * cache_mask->nb[1]),
                                cache_mask->ne[0], base[cache_col]};
        }

        const int64_t Hn = h1 - h0;
        qv.assign(size_t(Hn * Dv), v16{});
        acc.assign(size_t(Hn * Dv), v16{});
        for (int64_t h = 0; h < Hn; ++h) {
            const float * qh = reinterpret_cast<const float *>(static_cast<const char *>(q->data) + (h0 + h) * q->nb[1] +
                                                               g * q->nb[2]);
            std::memcpy(&qv[size_t(h * Dv)], qh, size_t(Dh) * sizeof(float));
        }
        m.assign(size_t(Hn), neg_inf);
        l.assign(size_t(Hn), 0.0f);
        float mk[kKeys] = {};
        float s[kKeys] = {};

        int nb = 0;  // keys in the current block
        // a block of up to kKeys converted keys, all of this thread's heads (the rows past nb hold
        // zeros or earlier keys: the accumulation below reads them with probability 0)
        auto flush = [&]() {
            if (nb == 0) {
                return;
            }
            for (int64_t h = 0; h < Hn; ++h) {
                const v16 * qh = &qv[size_t(h * Dv)];
                float mx = m[size_t(h)];
                for (int b = 0; b < nb; ++b) {
                    s[b] = scale * dot(qh, &kv[size_t(b * Dv)], Dv) + mk[b];
                    mx = std::max(mx, s[b]);
                }
                // online softmax: rescale what was accumulated under the old maximum
                const float corr = std::exp(m[size_t(h)] - mx);  // 0 when the old maximum was −inf
                float p[kKeys] = {};
                float lsum = l[size_t(h)] * corr;
                for (int b = 0; b < nb; ++b) {
                    p[b] = std::exp(s[b] - mx);
                    lsum += p[b];
                }
                // acc = acc·corr + Σ_b p_b·k_b, in four independent sums
                static_assert(kKeys == 8, "the sums below name the 8 keys");
                v16 * ah = &acc[size_t(h * Dv)];
                for (int64_t i = 0; i < Dv; ++i) {
                    const v16 * k = &kv[size_t(i)];
                    v16 a0 = ah[i] * corr + p[4] * k[4 * Dv];
                    v16 a1 = p[0] * k[0] + p[5] * k[5 * Dv];
                    v16 a2 = p[1] * k[Dv] + p[6] * k[6 * Dv];
                    v16 a3 = p[2] * k[2 * Dv] + p[3] * k[3 * Dv];
                    a3 += p[7] * k[7 * Dv];
                    ah[i] = (a0 + a1) + (a2 + a3);
                }
                m[size_t(h)] = mx;
                l[size_t(h)] = lsum;
            }
            nb = 0;
        };

        for (int pi = 0; pi < n_parts; ++pi) {
            const Part & pt = parts[pi];
            for (int64_t j = 0; j < pt.n; ++j) {
                const float mj = pt.mask[j];
                if (mj == neg_inf) {
                    continue;  // hidden
                }
                const int64_t r = pt.base + (pt.idx != nullptr ? int64_t(pt.idx[j]) : j);
                if ((pt.idx != nullptr && pt.idx[j] < 0) || r < 0 || r >= pt.rows->ne[1]) {
                    continue;  // not a row: never attended
                }
                row_to_float(pt.rows, r, reinterpret_cast<float *>(&kv[size_t(nb * Dv)]));
                mk[nb++] = mj;
                if (nb == kKeys) {
                    flush();
                }
            }
        }
        flush();

        // the sink joins each head's softmax denominator with no value
        const float * sk = static_cast<const float *>(sinks->data);
        for (int64_t h = 0; h < Hn; ++h) {
            const float sink = sk[h0 + h];
            const float mx = std::max(m[size_t(h)], sink);
            const float denom = l[size_t(h)] * std::exp(m[size_t(h)] - mx) + std::exp(sink - mx);
            const float f = std::exp(m[size_t(h)] - mx) / denom;
            float * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + (h0 + h) * dst->nb[1] + g * dst->nb[2]);
            const float * ah = reinterpret_cast<const float *>(&acc[size_t(h * Dv)]);
            for (int64_t d = 0; d < Dh; ++d) {
                out[d] = l[size_t(h)] > 0.0f ? ah[d] * f : 0.0f;
            }
        }
    }
}

}  // namespace dsv4::ops
