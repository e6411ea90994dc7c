// Graph pieces the generated blocks call besides ggml's own ops: rope on each head's tail with a
// layer's YaRN parameters (§3.4.3), and the weighted sum of the chosen experts' outputs.
#include "step.h"

#include <cmath>

namespace dsv4 {

// --- rope ------------------------------------------------------------------------------------------

RopeParams layer_rope(const dsv4_hparams & hp, uint32_t il) {
    RopeParams rp{};
    rp.n_dims = int(hp.n_rot);
    rp.beta_fast = 32.0f;  // llama.cpp's constants: it never reads the yarn_beta_* keys (§1.3, §1.5)
    rp.beta_slow = 1.0f;
    if (hp.compress_ratios[il] == 0) {
        rp.n_ctx_orig = int(hp.rope_orig_ctx);
        rp.freq_base = hp.rope_freq_base;
        rp.freq_scale = 1.0f;
        rp.ext_factor = 0.0f;
        rp.attn_factor = 1.0f;
    } else {
        rp.n_ctx_orig = int(hp.rope_orig_ctx);
        rp.freq_base = hp.compress_rope_freq_base;
        rp.freq_scale = 1.0f / hp.rope_scaling_factor;
        rp.ext_factor = 1.0f;
        // ggml multiplies cos/sin by 1 + 0.1·ln(1/freq_scale) on the YaRN path; the model has no
        // such magnitude factor (§7 #4), so cancel it
        rp.attn_factor = 1.0f / (1.0f + 0.1f * std::log(1.0f / rp.freq_scale));
    }
    return rp;
}

ggml_tensor * rope_tail(ggml_context * ctx, ggml_tensor * x, ggml_tensor * pos, const RopeParams & rp) {
    ggml_tensor * r = ggml_rope_ext(ctx, x, pos, nullptr, rp.n_dims, GGML_ROPE_TYPE_NORMAL, rp.n_ctx_orig,
                                    rp.freq_base, rp.freq_scale, rp.ext_factor, rp.attn_factor, rp.beta_fast,
                                    rp.beta_slow);
    return ggml_rope_set_offset(r, int(x->ne[0]) - rp.n_dims);  // the roped dims are the tail (§7 #2)
}

ggml_tensor * rope_tail_inverse(ggml_context * ctx, ggml_tensor * x, ggml_tensor * pos, const RopeParams & rp) {
    ggml_tensor * r = ggml_rope_ext_back(ctx, x, pos, nullptr, rp.n_dims, GGML_ROPE_TYPE_NORMAL, rp.n_ctx_orig,
                                         rp.freq_base, rp.freq_scale, rp.ext_factor, rp.attn_factor,
                                         rp.beta_fast, rp.beta_slow);
    return ggml_rope_set_offset(r, int(x->ne[0]) - rp.n_dims);
}

ggml_tensor * mix_experts(ggml_context * ctx, ggml_tensor * outs, ggml_tensor * weights) {
    const int64_t D = outs->ne[0], K = outs->ne[1], T = outs->ne[2];
    if (T == 1) {
        // one token: a matrix-vector product (outs^T · weights), two nodes instead of K + 1
        ggml_tensor * ot = ggml_cont(ctx, ggml_transpose(ctx, ggml_reshape_2d(ctx, outs, D, K)));  // ne{K, D}
        return ggml_reshape_2d(ctx, ggml_mul_mat(ctx, ot, weights), D, 1);
    }
    ggml_tensor * scaled = ggml_mul(ctx, outs, ggml_reshape_3d(ctx, weights, 1, K, T));
    ggml_tensor * acc = nullptr;
    for (int64_t k = 0; k < K; ++k) {
        ggml_tensor * slice = ggml_view_2d(ctx, scaled, D, T, scaled->nb[2], size_t(k) * scaled->nb[1]);
        acc = acc ? ggml_add(ctx, acc, slice) : slice;
    }
    return K == 1 ? ggml_cont(ctx, acc) : acc;
}

}  // namespace dsv4
