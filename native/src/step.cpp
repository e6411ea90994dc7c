#include "step.h"

#include "error.h"
#include "ops.h"
#include "ggml-backend.h"

#include <algorithm>
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

// --- plan --------------------------------------------------------------------------------------------

namespace {

constexpr int64_t kViewQuantum = 64;  // visible cache rows are padded to this (stable graph shapes)
const float kNegInf = -INFINITY;

int64_t round_up(int64_t x, int64_t q) {
    return (x + q - 1) / q * q;
}

int64_t pos_mod(int64_t p, int64_t m) {
    const int64_t r = p % m;
    return r < 0 ? r + m : r;
}

RatioPlan make_ratio_plan(int ratio, int64_t pos0, int64_t T, int64_t n_rows) {
    RatioPlan p;
    p.ratio = ratio;
    p.overlap = ratio == 4;
    p.ring_rows = p.overlap ? 2 * ratio : ratio;
    p.n_blocks = (T + ratio - 1) / ratio;
    p.dummy_row = n_rows - 1;
    const int64_t S = p.ring_rows;
    const int64_t end = pos0 + T;

    p.ape_rows.resize(size_t(T));
    for (int64_t i = 0; i < T; ++i) {
        p.ape_rows[size_t(i)] = int32_t((pos0 + i) % ratio);
    }

    // member row of position q: this batch's rows follow the ring's S rows
    auto row_of = [&](int64_t q) -> int32_t {
        return int32_t(q >= pos0 ? S + (q - pos0) : pos_mod(q, S));
    };
    // blocks completed in this batch: j with (j+1)·r − 1 in [pos0, end); the first is pos0 / r.
    // The graph always processes ceil(T/r) blocks (a stable shape); the rest are dummies.
    const int64_t j0 = pos0 / ratio;
    const int64_t members = p.overlap ? 2 * ratio : ratio;
    for (int64_t b = 0; b < p.n_blocks; ++b) {
        const int64_t j = j0 + b;
        const bool real = (j + 1) * ratio - 1 < end;
        for (int64_t m = 0; m < members; ++m) {
            if (!real) {
                p.member_rows.push_back(int32_t(S));  // a finite row of this batch: dummies stay finite
                continue;
            }
            // overlap: r previous-block tokens, then the r tokens of block j (§3.5)
            const int64_t q = p.overlap ? j * ratio - ratio + m : j * ratio + m;
            p.member_rows.push_back(row_of(q));
        }
        p.block_pos.push_back(real ? int32_t(j * ratio) : 0);
        p.write_rows.push_back(real ? j : p.dummy_row);
        p.n_real += real;
    }

    // the last ring_rows tokens of the batch stay in the ring, at row pos mod S
    for (int64_t i = std::max<int64_t>(0, T - S); i < T; ++i) {
        p.persist_src.push_back(int32_t(i));
        p.persist_dst.push_back(pos_mod(pos0 + i, S));
    }

    // block j is visible to query t iff j < (t+1)/r, including to the completing token (§3.4.4)
    const int64_t max_visible = end / ratio;
    p.n_view = std::min(round_up(std::max<int64_t>(max_visible, 1), kViewQuantum), n_rows - 1);
    p.view_rows.resize(size_t(p.n_view));
    for (int64_t j = 0; j < p.n_view; ++j) {
        p.view_rows[size_t(j)] = int32_t(j);
    }
    p.visible_mask.assign(size_t(p.n_view * T), kNegInf);
    for (int64_t i = 0; i < T; ++i) {
        const int64_t nvis = std::min((pos0 + i + 1) / ratio, p.n_view);
        std::fill_n(p.visible_mask.begin() + i * p.n_view, nvis, 0.0f);
    }
    return p;
}

}  // namespace

StepPlan make_plan(const dsv4_hparams & hp, int64_t pos0, const int32_t * tokens, int64_t T, int64_t n_rows4,
                   int64_t n_rows128, bool has4, bool has128) {
    StepPlan p;
    p.pos0 = pos0;
    p.n_tokens = T;
    p.positions.resize(size_t(T));
    p.tokens.assign(tokens, tokens + T);
    for (int64_t i = 0; i < T; ++i) {
        p.positions[size_t(i)] = int32_t(pos0 + i);
    }

    // window keys: ring slot s holds the latest position q < pos0 with q ≡ s (mod W), then the
    // batch; key position k is visible to query t iff k <= t and t − k < W (§7 #20)
    const int64_t W = hp.n_swa;
    const int64_t N = W + T;
    p.window_mask.assign(size_t(N * T), kNegInf);
    for (int64_t i = 0; i < T; ++i) {
        const int64_t t = pos0 + i;
        float * row = p.window_mask.data() + i * N;
        for (int64_t s = 0; s < W; ++s) {
            const int64_t last = pos0 - 1 - pos_mod(pos0 - 1 - s, W);  // latest q < pos0 in slot s
            if (last >= 0 && t - last < W) {
                row[s] = 0.0f;
            }
        }
        for (int64_t k = 0; k <= i; ++k) {
            if (i - k < W) {
                row[W + k] = 0.0f;
            }
        }
    }
    for (int64_t i = std::max<int64_t>(0, T - W); i < T; ++i) {
        p.window_src.push_back(int32_t(i));
        p.window_dst.push_back(pos_mod(pos0 + i, W));
    }
    p.window_rows.resize(size_t(W));
    for (int64_t s = 0; s < W; ++s) {
        p.window_rows[size_t(s)] = int32_t(s);
    }

    p.has4 = has4;
    p.has128 = has128;
    if (has4) {
        p.r4 = make_ratio_plan(4, pos0, T, n_rows4);
    }
    if (has128) {
        p.r128 = make_ratio_plan(128, pos0, T, n_rows128);
    }
    return p;
}

GraphKey graph_key(const StepPlan & p, OutMode out) {
    GraphKey k;
    k.n_tokens = p.n_tokens;
    k.n_view4 = p.has4 ? p.r4.n_view : 0;
    k.n_view128 = p.has128 ? p.r128.n_view : 0;
    k.real4 = p.has4 && p.r4.n_real > 0;
    k.real128 = p.has128 && p.r128.n_real > 0;
    k.out = out;
    return k;
}

// --- step ----------------------------------------------------------------------------------------------

Step::Step(ggml_context * ctx_, const dsv4_hparams & hp_, std::vector<LayerState> & layers, const StepPlan & plan)
    : ctx(ctx_), hp(hp_), n_tokens(plan.n_tokens), layers_(layers), plan_(plan) {
    positions = input(GGML_TYPE_I32, n_tokens);
    tokens = input(GGML_TYPE_I32, n_tokens);
    ropes_.reserve(hp.n_layer_all);
    for (uint32_t il = 0; il < hp.n_layer_all; ++il) {
        ropes_.push_back(layer_rope(hp, il));
    }
}

ggml_tensor * Step::input(ggml_type type, int64_t ne0, int64_t ne1) {
    ggml_tensor * t = ggml_new_tensor_2d(ctx, type, ne0, ne1);
    ggml_set_input(t);
    return t;
}

const RatioPlan & Step::ratio_plan(Stream st) const {
    return st == Stream::HCA ? plan_.r128 : plan_.r4;
}

Step::RatioInputs & Step::inputs(Stream st) {
    RatioInputs & in = st == Stream::HCA ? in128_ : in4_;
    if (in.ape_rows == nullptr) {
        const RatioPlan & p = ratio_plan(st);
        in.ape_rows = input(GGML_TYPE_I32, n_tokens);
        in.member_rows = input(GGML_TYPE_I32, int64_t(p.member_rows.size()));
        in.block_pos = input(GGML_TYPE_I32, p.n_blocks);
        in.write_rows = input(GGML_TYPE_I64, p.n_blocks);
        in.persist_src = input(GGML_TYPE_I32, int64_t(p.persist_src.size()));
        in.persist_dst = input(GGML_TYPE_I64, int64_t(p.persist_dst.size()));
        in.visible_f32 = input(GGML_TYPE_F32, p.n_view, n_tokens);
        in.visible_f16 = input(GGML_TYPE_F16, p.n_view, n_tokens);
        in.view_rows = input(GGML_TYPE_I32, p.n_view);
    }
    return in;
}

ggml_tensor * Step::kept_rows(ggml_tensor * batch, ggml_tensor * src, int64_t ring_rows) {
    // a batch no longer than the ring keeps every row, in order: no gather needed
    return n_tokens <= ring_rows ? batch : ggml_get_rows(ctx, batch, src);
}

ggml_tensor * Step::as_f32(ggml_tensor * t, ggml_tensor * rows) {
    return t->type == GGML_TYPE_F32 ? t : ggml_get_rows(ctx, t, rows);
}

CompressorState & Step::state(uint32_t il, Stream st) {
    return st == Stream::INDEXER ? layers_[il].index : layers_[il].main;
}

KeySet Step::window(uint32_t il, ggml_tensor * kv) {
    ggml_tensor * ring = layers_[il].window;
    ggml_tensor * kv2 = ggml_reshape_2d(ctx, kv, kv->ne[0], n_tokens);
    if (window_mask_ == nullptr) {
        window_mask_ = input(GGML_TYPE_F32, hp.n_swa + n_tokens, n_tokens);
        window_src_ = input(GGML_TYPE_I32, int64_t(plan_.window_src.size()));
        window_dst_ = input(GGML_TYPE_I64, int64_t(plan_.window_dst.size()));
        window_rows_ = input(GGML_TYPE_I32, hp.n_swa);
    }
    KeySet keys;
    keys.shared = ggml_concat(ctx, as_f32(ring, window_rows_), kv2, 1);
    keys.shared_mask = window_mask_;
    keys.ring = ring;
    keys.fresh = kv2;
    keys.ring_mask = window_mask_;
    deferred_.push_back(ggml_set_rows(ctx, ring, kept_rows(kv2, window_src_, hp.n_swa), window_dst_));
    return keys;
}

ggml_tensor * Step::ape_rows(Stream st) {
    return inputs(st).ape_rows;
}

ggml_tensor * Step::block_positions(Stream st) {
    return inputs(st).block_pos;
}

CompressorRows Step::compressor_rows(uint32_t il, Stream st, ggml_tensor * a, ggml_tensor * z) {
    RatioInputs & in = inputs(st);
    const RatioPlan & p = ratio_plan(st);
    CompressorState & cs = state(il, st);
    // the ring rows this batch keeps are written after the pooling has read the old ones
    deferred_.push_back(ggml_set_rows(ctx, cs.kv, kept_rows(a, in.persist_src, p.ring_rows), in.persist_dst));
    deferred_.push_back(ggml_set_rows(ctx, cs.score, kept_rows(z, in.persist_src, p.ring_rows), in.persist_dst));
    return {cs.kv, a, cs.score, z, in.member_rows, p.n_blocks};
}

ggml_tensor * Step::store(uint32_t il, Stream st, ggml_tensor * entries) {
    RatioInputs & in = inputs(st);
    const RatioPlan & p = ratio_plan(st);
    ggml_tensor * cache = state(il, st).cache;
    if (p.n_real == 0) {
        // no block completes in this batch (most decode steps): nothing is written, so the
        // pooling of the dummy block is dead code that ggml never computes
        return ggml_view_2d(ctx, cache, cache->ne[0], p.n_view, cache->nb[1], 0);
    }
    ggml_tensor * rows = ggml_reshape_2d(ctx, entries, entries->ne[0], entries->ne[2]);
    ggml_tensor * written = ggml_set_rows(ctx, cache, rows, in.write_rows);
    effects_.push_back(written);
    // a view of the written cache: attention reads it after the write
    return ggml_view_2d(ctx, written, cache->ne[0], p.n_view, cache->nb[1], 0);
}

KeySet Step::with_all(uint32_t, const KeySet & keys, ggml_tensor * cache) {
    RatioInputs & in = inputs(Stream::HCA);
    KeySet out = keys;
    out.shared = ggml_concat(ctx, keys.shared, as_f32(cache, in.view_rows), 1);
    out.shared_mask = ggml_concat(ctx, keys.shared_mask, in.visible_f32, 0);
    out.cache = cache;
    out.cache_mask = in.visible_f32;
    return out;
}

ggml_tensor * Step::indexer_mask() {
    return inputs(Stream::INDEXER).visible_f16;
}

KeySet Step::with_selected(uint32_t, const KeySet & keys, ggml_tensor * cache, ggml_tensor * scores) {
    RatioInputs & in = inputs(Stream::CSA);
    const int64_t n_view = scores->ne[0];
    const int64_t k = std::min<int64_t>(hp.indexer_top_k, n_view);
    KeySet out = keys;
    if (k >= n_view) {
        // every visible block is selected (§3.6): plain causal attention over the cache view;
        // the indexer scores are then unused, and ggml never computes them
        out.shared = ggml_concat(ctx, keys.shared, as_f32(cache, in.view_rows), 1);
        out.shared_mask = ggml_concat(ctx, keys.shared_mask, in.visible_f32, 0);
        out.cache = cache;
        out.cache_mask = in.visible_f32;
        return out;
    }
    if (n_tokens == 1) {
        // ne{k, 1}, any order; on the CPU a selection (ties to the lower block, as the reference)
        ggml_tensor * top = cpu ? ops::topk_rows(ctx, scores, k) : ggml_top_k(ctx, scores, int(k));
        ggml_tensor * picked_score = ggml_get_rows(ctx, ggml_reshape_3d(ctx, scores, 1, n_view, n_tokens), top);
        // decode: gather the k picked entries
        ggml_tensor * picked = ggml_get_rows(ctx, cache, ggml_reshape_1d(ctx, top, k));
        out.own = ggml_reshape_3d(ctx, picked, cache->ne[0], k, 1);
        // picks of blocks the query cannot see (fewer than k visible) have score -inf: mask them.
        // step(s + 1e30) is 1 for any finite score and 0 for -inf; map 1 -> 0, 0 -> -1e30.
        ggml_tensor * valid = ggml_step(ctx, ggml_scale_bias(ctx, picked_score, 1.0f, 1e30f));
        out.own_mask = ggml_reshape_2d(ctx, ggml_scale_bias(ctx, valid, 1e30f, -1e30f), k, 1);
        out.cache = cache;
        out.cache_mask = out.own_mask;
        out.cache_idx = ggml_reshape_1d(ctx, top, k);
        return out;
    }
    // a batch: every query attends to the whole cache view through a mask that is 0 only at its
    // own picks (the scores are −inf at hidden blocks, which are never picked)
    out.shared = ggml_concat(ctx, keys.shared, as_f32(cache, in.view_rows), 1);
    out.shared_mask = ggml_concat(ctx, keys.shared_mask, ops::topk_mask(ctx, scores, k), 0);
    return out;
}

void Step::set_inputs() const {
    auto put = [](ggml_tensor * t, const void * data, size_t bytes) {
        // inputs no node of the graph reads are not allocated
        if (t != nullptr && t->buffer != nullptr && bytes > 0) {
            ggml_backend_tensor_set(t, data, 0, bytes);
        }
    };
    put(positions, plan_.positions.data(), plan_.positions.size() * sizeof(int32_t));
    put(tokens, plan_.tokens.data(), plan_.tokens.size() * sizeof(int32_t));
    put(window_mask_, plan_.window_mask.data(), plan_.window_mask.size() * sizeof(float));
    put(window_src_, plan_.window_src.data(), plan_.window_src.size() * sizeof(int32_t));
    put(window_dst_, plan_.window_dst.data(), plan_.window_dst.size() * sizeof(int64_t));
    put(window_rows_, plan_.window_rows.data(), plan_.window_rows.size() * sizeof(int32_t));
    for (int which = 0; which < 2; ++which) {
        const RatioInputs & in = which == 0 ? in4_ : in128_;
        const RatioPlan & p = which == 0 ? plan_.r4 : plan_.r128;
        if (in.ape_rows == nullptr) {
            continue;
        }
        put(in.ape_rows, p.ape_rows.data(), p.ape_rows.size() * sizeof(int32_t));
        put(in.member_rows, p.member_rows.data(), p.member_rows.size() * sizeof(int32_t));
        put(in.block_pos, p.block_pos.data(), p.block_pos.size() * sizeof(int32_t));
        put(in.write_rows, p.write_rows.data(), p.write_rows.size() * sizeof(int64_t));
        put(in.persist_src, p.persist_src.data(), p.persist_src.size() * sizeof(int32_t));
        put(in.persist_dst, p.persist_dst.data(), p.persist_dst.size() * sizeof(int64_t));
        put(in.visible_f32, p.visible_mask.data(), p.visible_mask.size() * sizeof(float));
        put(in.view_rows, p.view_rows.data(), p.view_rows.size() * sizeof(int32_t));
        std::vector<ggml_fp16_t> half(p.visible_mask.size());
        ggml_fp32_to_fp16_row(p.visible_mask.data(), half.data(), int64_t(half.size()));
        put(in.visible_f16, half.data(), half.size() * sizeof(ggml_fp16_t));
    }
}

// --- attention -----------------------------------------------------------------------------------------

namespace {

// ggml's flash attention reads the keys (= values) row by row, so nothing is transposed or
// copied; with F32 keys it accumulates in F32 (its F16 path would round the sums). Keys picked
// per query (CSA decode) join the shared ones for the single query.
ggml_tensor * attend_flash(ggml_context * ctx, ggml_tensor * q, const KeySet & keys, ggml_tensor * sinks, float scale) {
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

ggml_tensor * attend(Step & s, ggml_tensor * q, const KeySet & keys, ggml_tensor * sinks) {
    ggml_context * ctx = s.ctx;
    const int64_t Dh = q->ne[0], H = q->ne[1], T = q->ne[2];
    const float scale = 1.0f / std::sqrt(float(Dh));
    const int64_t N = keys.shared->ne[1];
    if (s.cpu && T == 1 && keys.ring != nullptr) {
        // a decode step on the CPU: the fused op reads the stored rows in place, once for all heads
        return ops::attend_decode(ctx, q, sinks, scale, keys.ring, keys.fresh, keys.ring_mask, keys.cache,
                                  keys.cache_mask, keys.cache_idx);
    }
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
    (void) Dh;
    return out;
}

ggml_tensor * Step::last_tensor() {
    ggml_tensor * t = tail_ != nullptr ? tail_ : ggml_get_first_tensor(ctx);
    while (t != nullptr) {
        ggml_tensor * next = ggml_get_next_tensor(ctx, t);
        if (next == nullptr) {
            break;
        }
        t = next;
    }
    tail_ = t;
    return t;
}

Scope::Scope(Step & s, const char * name) : s_(s), name_(name), mark_(s.last_tensor()) {}

Scope::~Scope() {
    ggml_context * ctx = s_.ctx;
    for (ggml_tensor * t = mark_ != nullptr ? ggml_get_next_tensor(ctx, mark_) : ggml_get_first_tensor(ctx);
         t != nullptr; t = ggml_get_next_tensor(ctx, t)) {
        if (t->name[0] == '\0') {
            ggml_set_name(t, name_);
        }
    }
}

}  // namespace dsv4
