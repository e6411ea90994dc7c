#include "ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dsv4::ops {

ggml_tensor * topk_mask(ggml_context * ctx, ggml_tensor * scores, int64_t k) {
    GGML_ASSERT(scores->type == GGML_TYPE_F32 && ggml_is_contiguous_rows(scores) && scores->ne[2] == 1 &&
                scores->ne[3] == 1 && k >= 1);
    ggml_tensor * args[] = {scores};
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, scores->ne[0], scores->ne[1], 1, 1, args, 1, topk_mask_cpu,
                                       GGML_N_TASKS_MAX, nullptr);
    out->op_params[kParamSlot] = int32_t(std::min<int64_t>(k, INT32_MAX));
    ggml_format_name(out, "topk_mask");
    return out;
}

namespace {

// Higher score first; exact ties: the lower index (the reference's stable sort).
bool ranks_before(const std::pair<float, int64_t> & a, const std::pair<float, int64_t> & b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
}

}  // namespace

ggml_tensor * topk_rows(ggml_context * ctx, ggml_tensor * scores, int64_t k) {
    GGML_ASSERT(scores->type == GGML_TYPE_F32 && ggml_is_contiguous_rows(scores) && scores->ne[2] == 1 &&
                scores->ne[3] == 1 && k >= 1 && k <= scores->ne[0]);
    ggml_tensor * args[] = {scores};
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_I32, k, scores->ne[1], 1, 1, args, 1, topk_rows_cpu,
                                       GGML_N_TASKS_MAX, nullptr);
    ggml_format_name(out, "topk_rows");
    return out;
}

void topk_rows_cpu(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * scores = dst->src[0];
    const int64_t n = scores->ne[0], T = scores->ne[1], k = dst->ne[0];
    const auto [t0, t1] = thread_share(T, ith, nth);
    thread_local std::vector<std::pair<float, int64_t>> all;
    for (int64_t t = t0; t < t1; ++t) {
        const float * s = reinterpret_cast<const float *>(static_cast<const char *>(scores->data) + t * scores->nb[1]);
        int32_t * out = reinterpret_cast<int32_t *>(static_cast<char *>(dst->data) + t * dst->nb[1]);
        all.resize(size_t(n));
        for (int64_t j = 0; j < n; ++j) {
            all[size_t(j)] = {std::isnan(s[j]) ? -std::numeric_limits<float>::infinity() : s[j], j};
        }
        std::nth_element(all.begin(), all.begin() + (k - 1), all.end(), ranks_before);
        for (int64_t i = 0; i < k; ++i) {
            out[i] = int32_t(all[size_t(i)].second);
        }
    }
}

void topk_mask_cpu(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * scores = dst->src[0];
    const int64_t n = scores->ne[0], T = scores->ne[1], k = dst->op_params[kParamSlot];
    const auto [t0, t1] = thread_share(T, ith, nth);
    thread_local std::vector<std::pair<float, int64_t>> finite;
    for (int64_t t = t0; t < t1; ++t) {
        const float * s = reinterpret_cast<const float *>(static_cast<const char *>(scores->data) + t * scores->nb[1]);
        float * out = reinterpret_cast<float *>(static_cast<char *>(dst->data) + t * dst->nb[1]);
        finite.clear();
        for (int64_t j = 0; j < n; ++j) {
            out[j] = -std::numeric_limits<float>::infinity();
            if (std::isfinite(s[j])) {
                finite.emplace_back(s[j], j);
            }
        }
        if (int64_t(finite.size()) > k) {  // higher score first; exact ties: the lower index
            std::nth_element(finite.begin(), finite.begin() + (k - 1), finite.end(), ranks_before);
            finite.resize(size_t(k));
        }
        for (const auto & p : finite) {
            out[p.second] = 0.0f;
        }
    }
}

}  // namespace dsv4::ops
