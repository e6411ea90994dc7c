#include "ops.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace dsv4::ops {

namespace {

// ggml_custom_4d carries no parameters but its sources; the result's shape holds the rest.
struct PoolShape {
    int64_t d, width, n_blocks, members, ring_rows;
    bool overlap;
};

PoolShape pool_shape(const ggml_tensor * dst) {
    const ggml_tensor * ring_kv = dst->src[0];
    const ggml_tensor * rows = dst->src[4];
    PoolShape s;
    s.d = dst->ne[0];
    s.width = ring_kv->ne[0];
    s.n_blocks = dst->ne[1];
    s.members = s.n_blocks > 0 ? rows->ne[0] / s.n_blocks : 0;
    s.ring_rows = ring_kv->ne[1];
    s.overlap = s.width == 2 * s.d;
    return s;
}

}  // namespace

ggml_tensor * compress_pool(ggml_context * ctx, ggml_tensor * ring_kv, ggml_tensor * kv, ggml_tensor * ring_score,
                            ggml_tensor * score, ggml_tensor * rows, int64_t n_blocks, bool overlap) {
    const int64_t width = ring_kv->ne[0];
    GGML_ASSERT(ring_kv->type == GGML_TYPE_F32 && kv->type == GGML_TYPE_F32 && ring_score->type == GGML_TYPE_F32 &&
                score->type == GGML_TYPE_F32 && rows->type == GGML_TYPE_I32);
    GGML_ASSERT(kv->ne[0] == width && ring_score->ne[0] == width && score->ne[0] == width);
    GGML_ASSERT(ring_score->ne[1] == ring_kv->ne[1] && score->ne[1] == kv->ne[1]);
    GGML_ASSERT(ggml_is_contiguous_rows(ring_kv) && ggml_is_contiguous_rows(kv) && ggml_is_contiguous_rows(ring_score) &&
                ggml_is_contiguous_rows(score) && ggml_is_contiguous(rows));
    GGML_ASSERT(n_blocks > 0 && rows->ne[0] % n_blocks == 0 && (!overlap || (width % 2 == 0 && (rows->ne[0] / n_blocks) % 2 == 0)));
    ggml_tensor * args[] = {ring_kv, kv, ring_score, score, rows};
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, overlap ? width / 2 : width, n_blocks, 1, 1, args, 5,
                                       compress_pool_cpu, GGML_N_TASKS_MAX, nullptr);
    ggml_format_name(out, "compress_pool");
    return out;
}

void compress_pool_cpu(ggml_tensor * dst, int ith, int nth, void *) {
    const PoolShape s = pool_shape(dst);
    const ggml_tensor * ring_kv = dst->src[0];
    const ggml_tensor * kv = dst->src[1];
    const ggml_tensor * ring_score = dst->src[2];
    const ggml_tensor * score = dst->src[3];
    const int32_t * rows = static_cast<const int32_t *>(dst->src[4]->data);

    // work items: (block, tile of kTile channels); per channel, the members' maximum logit, then
    // Σ e^(z − max)·v and Σ e^(z − max) (the softmax of ggml_soft_max, without its temporaries)
    constexpr int64_t kTile = 64;
    const int64_t tiles = (s.d + kTile - 1) / kTile;
    const int64_t n_items = s.n_blocks * tiles;
    const auto [i0, i1] = thread_share(n_items, ith, nth);

    auto member = [&](const ggml_tensor * ring, const ggml_tensor * batch, int64_t b, int64_t m, int64_t c0) {
        const int64_t r = rows[m + s.members * b];
        const ggml_tensor * t = r < s.ring_rows ? ring : batch;
        const int64_t row = r < s.ring_rows ? r : r - s.ring_rows;
        const int64_t f = (s.overlap && m >= s.members / 2 ? s.d : 0) + c0;
        return reinterpret_cast<const float *>(static_cast<const char *>(t->data) + row * t->nb[1]) + f;
    };
    float mx[kTile], sum[kTile], acc[kTile];
    for (int64_t item = i0; item < i1; ++item) {
        const int64_t b = item / tiles;
        const int64_t c0 = (item % tiles) * kTile;
        const int64_t nc = std::min(kTile, s.d - c0);
        std::fill(mx, mx + nc, -std::numeric_limits<float>::infinity());
        for (int64_t m = 0; m < s.members; ++m) {
            const float * z = member(ring_score, score, b, m, c0);
            for (int64_t i = 0; i < nc; ++i) {
                mx[i] = std::max(mx[i], z[i]);
            }
        }
        std::fill(sum, sum + nc, 0.0f);
        std::fill(acc, acc + nc, 0.0f);
        for (int64_t m = 0; m < s.members; ++m) {
            const float * z = member(ring_score, score, b, m, c0);
            const float * v = member(ring_kv, kv, b, m, c0);
            for (int64_t i = 0; i < nc; ++i) {
                const float e = std::exp(z[i] - mx[i]);
                sum[i] += e;
                acc[i] += e * v[i];
            }
        }
        float * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + b * dst->nb[1]) + c0;
        for (int64_t i = 0; i < nc; ++i) {
            out[i] = acc[i] / sum[i];
        }
    }
}

}  // namespace dsv4::ops
