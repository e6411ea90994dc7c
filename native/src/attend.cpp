// Attention over a step's key sets: the CPU decode group through our fused op, every other
// segment through ggml's flash attention (CPU) or matmul + softmax.
#include "step.h"

#include "ops.h"

#include <cmath>

namespace dsv4 {

// --- attention -----------------------------------------------------------------------------------------

namespace {

// ggml's flash attention reads the keys (= values) row by row, so nothing is transposed or
// copied; with F32 keys it accumulates in F32 (its F16 path would round the sums). Keys picked
// per query (CSA decode) join the shared ones for the single query.
ggml_tensor * attend_flash(ggml_context * ctx, ggml_tensor * q, const SegmentKeys & keys, ggml_tensor * sinks, float scale) {
    ggml_tensor * k = keys.shared;
    ggml_tensor * mask = keys.shared_mask;
    if (keys.own != nullptr) {
        k = ggml_concat(ctx, k, ggml_reshape_2d(ctx, keys.own, keys.own->ne[0], keys.own->ne[1]), 1);
        mask = ggml_concat(ctx, mask, keys.own_mask, 0);
    }
    ggml_tensor * k4 = ggml_reshape_4d(ctx, k, k->ne[0], k->ne[1], 1, 1);
    ggml_tensor * q4 = ggml_permute(ctx, q, 0, 2, 1, 3);  // ne{Dh, T, H}
    ggml_tensor * out = ggml_flash_attn_ext(ctx, q4, k4, k4, ggml_cast(ctx, mask, GGML_TYPE_F16), scale, 0.0f, 0.0f);
    GGML_ASSERT(ggml_prec_set_acc(out, GGML_PREC_F32));  // accumulate in F32
    ggml_flash_attn_ext_add_sinks(out, sinks);
    return out;  // ne{Dh, H, T}
}

}  // namespace

namespace {

// One segment's attention: ggml's flash attention, or matmul + softmax.
ggml_tensor * attend_segment(Step & s, ggml_tensor * q, const SegmentKeys & keys, ggml_tensor * sinks, float scale) {
    ggml_context * ctx = s.ctx;
    const int64_t H = q->ne[1], T = q->ne[2];
    const int64_t N = keys.shared->ne[1];
    if (s.flash_attn && keys.shared->type == GGML_TYPE_F32 && (keys.own == nullptr || T == 1)) {
        return attend_flash(ctx, q, keys, sinks, scale);
    }

    // scores ne{keys, T, H}: the mask broadcasts over heads, the sink is per head (ne2);
    // a contiguous q lets batched matmuls take the sgemm path
    ggml_tensor * qt = T > 1 ? ggml_cont(ctx, ggml_permute(ctx, q, 0, 2, 1, 3)) : ggml_permute(ctx, q, 0, 2, 1, 3);
    ggml_tensor * scores = ggml_mul_mat(ctx, keys.shared, qt);
    ggml_tensor * mask = keys.shared_mask;
    int64_t k = 0;
    if (keys.own != nullptr) {
        k = keys.own->ne[1];
        ggml_tensor * own = ggml_mul_mat(ctx, keys.own, q);  // ne{k, H, T}
        scores = ggml_concat(ctx, scores, ggml_cont(ctx, ggml_permute(ctx, own, 0, 2, 1, 3)), 0);
        mask = ggml_concat(ctx, mask, keys.own_mask, 0);
    }
    ggml_tensor * probs = ggml_soft_max_ext(ctx, scores, mask, scale, 0.0f);
    ggml_soft_max_add_sinks(probs, sinks);

    // values = keys: out[:, t, h] = Σ_n keys[:, n]·probs[n, t, h]
    ggml_tensor * p_shared = k ? ggml_cont(ctx, ggml_view_3d(ctx, probs, N, T, H, probs->nb[1], probs->nb[2], 0)) : probs;
    ggml_tensor * vt = ggml_cont(ctx, ggml_transpose(ctx, keys.shared));  // ne{N, Dh}
    ggml_tensor * out = ggml_mul_mat(ctx, vt, p_shared);                 // ne{Dh, T, H}
    out = ggml_cont(ctx, ggml_permute(ctx, out, 0, 2, 1, 3));            // ne{Dh, H, T}
    if (k) {
        ggml_tensor * p_own = ggml_view_3d(ctx, probs, k, T, H, probs->nb[1], probs->nb[2],
                                           size_t(N) * ggml_element_size(probs));
        p_own = ggml_cont(ctx, ggml_permute(ctx, p_own, 0, 2, 1, 3));                  // ne{k, H, T}
        ggml_tensor * vt_own = ggml_cont(ctx, ggml_permute(ctx, keys.own, 1, 0, 2, 3));  // ne{k, Dh, T}
        out = ggml_add(ctx, out, ggml_mul_mat(ctx, vt_own, p_own));                      // ne{Dh, H, T}
    }
    return out;
}

// queries [offset, offset + n) of q ne{Dh, H, T}
ggml_tensor * query_rows(ggml_context * ctx, ggml_tensor * q, int64_t offset, int64_t n) {
    if (offset == 0 && n == q->ne[2]) {
        return q;
    }
    return ggml_view_3d(ctx, q, q->ne[0], q->ne[1], n, q->nb[1], q->nb[2], size_t(offset) * q->nb[2]);
}

}  // namespace

ggml_tensor * attend(Step & s, ggml_tensor * q, const KeySet & keys, ggml_tensor * sinks) {
    ggml_context * ctx = s.ctx;
    const float scale = 1.0f / std::sqrt(float(q->ne[0]));
    ggml_tensor * out = nullptr;
    auto append = [&](ggml_tensor * part) { out = out == nullptr ? part : ggml_concat(ctx, out, part, 2); };
    if (keys.group.ring != nullptr) {
        // the decode group (CPU): one query per sequence; the fused op reads each one's stored
        // rows in place, once for all heads
        const GroupKeys & g = keys.group;
        append(ops::attend_decode(ctx, query_rows(ctx, q, 0, s.n_group), sinks, scale, g.ring, g.fresh, g.ring_mask,
                                  g.bases, g.cache != nullptr ? g.cache_col : 1, g.cache, g.cache_mask, g.cache_idx));
    }
    for (const SegmentKeys & sk : keys.segments) {
        ggml_tensor * qs = query_rows(ctx, q, sk.offset, sk.n);
        if (qs != q && !ggml_is_contiguous(qs)) {
            qs = ggml_cont(ctx, qs);
        }
        append(attend_segment(s, qs, sk, sinks, scale));
    }
    return out;
}

}  // namespace dsv4
