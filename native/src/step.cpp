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

RatioPlan make_ratio_plan(int ratio, int64_t ring_rows, int64_t n_rows, int64_t n_slots,
                          const std::vector<Segment> & segs, int64_t n_group, int64_t T) {
    RatioPlan p;
    p.ratio = ratio;
    p.overlap = ratio == 4;
    p.ring_rows = ring_rows;
    const int64_t S = ring_rows;
    const int64_t synthetic = n_slots * S;  // value 0, logit -inf: positions before 0 (§7 #29)
    const int64_t batch0 = synthetic + 1;   // batch rows follow every ring row
    const int64_t members = p.overlap ? 2 * ratio : ratio;
    p.ape_rows.resize(size_t(T));
    p.cache_base.resize(size_t(T));

    int64_t max_visible = 1;
    for (const Segment & sg : segs) {
        const int64_t end = sg.pos0 + sg.n;
        for (int64_t i = 0; i < sg.n; ++i) {
            p.ape_rows[size_t(sg.offset + i)] = int32_t((sg.pos0 + i) % ratio);
            p.cache_base[size_t(sg.offset + i)] = int32_t(sg.slot * n_rows);
        }
        // member row of position q: the batch's rows follow the rings
        auto row_of = [&](int64_t q) -> int32_t {
            if (q < 0) {
                return int32_t(synthetic);
            }
            return int32_t(q >= sg.pos0 ? batch0 + sg.offset + (q - sg.pos0) : sg.slot * S + pos_mod(q, S));
        };
        // blocks completed by the segment: j with (j+1)·r − 1 in [pos0, end); the first is pos0 / r.
        // The graph always processes ceil(n/r) blocks per segment (a stable shape); the rest are dummies.
        const int64_t j0 = sg.pos0 / ratio;
        const int64_t blocks = (sg.n + ratio - 1) / ratio;
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t j = j0 + b;
            const bool real = (j + 1) * ratio - 1 < end;
            for (int64_t m = 0; m < members; ++m) {
                if (!real) {
                    p.member_rows.push_back(int32_t(batch0 + sg.offset));  // a finite row: dummies stay finite
                    continue;
                }
                // overlap: r previous-block tokens, then the r tokens of block j (§3.5)
                const int64_t q = p.overlap ? j * ratio - ratio + m : j * ratio + m;
                p.member_rows.push_back(row_of(q));
            }
            p.block_pos.push_back(real ? int32_t(j * ratio) : 0);
            p.write_rows.push_back(sg.slot * n_rows + (real ? j : n_rows - 1));
            p.n_real += real;
        }
        p.n_blocks += blocks;
        // the last ring_rows tokens of the segment stay in its ring, at row pos mod S
        for (int64_t i = std::max<int64_t>(0, sg.n - S); i < sg.n; ++i) {
            p.persist_src.push_back(int32_t(sg.offset + i));
            p.persist_dst.push_back(sg.slot * S + pos_mod(sg.pos0 + i, S));
        }
        max_visible = std::max(max_visible, end / ratio);
    }

    // block j is visible to query t iff j < (t+1)/r, including to the completing token (§3.4.4)
    p.n_view = std::min(round_up(max_visible, kViewQuantum), n_rows - 1);
    p.visible_mask.assign(size_t(p.n_view * T), kNegInf);
    for (const Segment & sg : segs) {
        for (int64_t i = 0; i < sg.n; ++i) {
            const int64_t nvis = std::min((sg.pos0 + i + 1) / ratio, p.n_view);
            std::fill_n(p.visible_mask.begin() + (sg.offset + i) * p.n_view, nvis, 0.0f);
        }
    }
    for (size_t k = size_t(n_group); k < segs.size(); ++k) {
        for (int64_t j = 0; j < p.n_view; ++j) {
            p.segment_rows.push_back(int32_t(segs[k].slot * n_rows + j));
        }
    }
    return p;
}

}  // namespace

Geometry make_geometry(const dsv4_hparams & hp, int64_t n_ctx, int64_t n_slots, int64_t slack) {
    Geometry g;
    g.n_slots = n_slots;
    g.slack = slack;
    g.window_rows = int64_t(hp.n_swa) + slack;
    g.ring4 = 2 * 4 + slack;
    g.ring128 = 128 + slack;
    g.n_rows4 = n_ctx / 4 + 1;
    g.n_rows128 = n_ctx / 128 + 1;
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        g.has4 = g.has4 || hp.compress_ratios[il] == 4;
        g.has128 = g.has128 || hp.compress_ratios[il] == 128;
    }
    return g;
}

StepPlan make_plan(const dsv4_hparams & hp, const Geometry & geo, const std::vector<Segment> & segs, int64_t n_group,
                   const int32_t * tokens, std::vector<int32_t> out_rows) {
    StepPlan p;
    p.segments = segs;
    p.n_group = n_group;
    int64_t T = 0;
    for (const Segment & sg : segs) {
        T += sg.n;
    }
    p.n_tokens = T;
    p.tokens.assign(tokens, tokens + T);
    p.positions.resize(size_t(T));
    for (const Segment & sg : segs) {
        for (int64_t i = 0; i < sg.n; ++i) {
            p.positions[size_t(sg.offset + i)] = int32_t(sg.pos0 + i);
        }
    }
    p.out_rows = std::move(out_rows);

    // window keys: ring row s of a slot holds the latest position q < pos0 with q ≡ s (mod R),
    // then come the segment's own tokens; key position k is visible to query t iff k <= t and
    // t − k < W (§7 #20)
    const int64_t W = hp.n_swa, R = geo.window_rows;
    p.window_rows = R;
    auto ring_visible = [&](int64_t pos0, int64_t t, float * row) {
        for (int64_t s = 0; s < R; ++s) {
            const int64_t last = pos0 - 1 - pos_mod(pos0 - 1 - s, R);  // latest q < pos0 in row s
            row[s] = last >= 0 && t - last < W ? 0.0f : kNegInf;
        }
    };
    p.group_mask.assign(size_t((R + 1) * n_group), kNegInf);
    for (int64_t g = 0; g < n_group; ++g) {
        const Segment & sg = segs[size_t(g)];
        ring_visible(sg.pos0, sg.pos0, p.group_mask.data() + g * (R + 1));
        p.group_mask[size_t(g * (R + 1) + R)] = 0.0f;  // its own key
        p.group_bases.push_back(int32_t(sg.slot * R));
        p.group_bases.push_back(int32_t(sg.slot * geo.n_rows4));
        p.group_bases.push_back(int32_t(sg.slot * geo.n_rows128));
    }
    for (size_t k = size_t(n_group); k < segs.size(); ++k) {
        const Segment & sg = segs[k];
        const int64_t N = R + sg.n;
        std::vector<float> mask(size_t(N * sg.n), kNegInf);
        for (int64_t i = 0; i < sg.n; ++i) {
            float * row = mask.data() + i * N;
            ring_visible(sg.pos0, sg.pos0 + i, row);
            for (int64_t j = 0; j <= i; ++j) {
                if (i - j < W) {
                    row[R + j] = 0.0f;
                }
            }
        }
        p.segment_mask.push_back(std::move(mask));
        std::vector<int32_t> ring;
        for (int64_t s = 0; s < R; ++s) {
            ring.push_back(int32_t(sg.slot * R + s));
        }
        p.segment_ring.push_back(std::move(ring));
    }
    for (const Segment & sg : segs) {
        for (int64_t i = std::max<int64_t>(0, sg.n - R); i < sg.n; ++i) {
            p.window_src.push_back(int32_t(sg.offset + i));
            p.window_dst.push_back(sg.slot * R + pos_mod(sg.pos0 + i, R));
        }
    }

    p.has4 = geo.has4;
    p.has128 = geo.has128;
    if (geo.has4) {
        p.r4 = make_ratio_plan(4, geo.ring4, geo.n_rows4, geo.n_slots, segs, n_group, T);
    }
    if (geo.has128) {
        p.r128 = make_ratio_plan(128, geo.ring128, geo.n_rows128, geo.n_slots, segs, n_group, T);
    }
    return p;
}

GraphKey graph_key(const StepPlan & p) {
    GraphKey k;
    k.n_tokens = p.n_tokens;
    k.n_group = p.n_group;
    for (size_t i = size_t(p.n_group); i < p.segments.size(); ++i) {
        k.segment_lengths.push_back(p.segments[i].n);
    }
    k.n_view4 = p.has4 ? p.r4.n_view : 0;
    k.n_view128 = p.has128 ? p.r128.n_view : 0;
    k.real4 = p.has4 && p.r4.n_real > 0;
    k.real128 = p.has128 && p.r128.n_real > 0;
    k.n_out = int64_t(p.out_rows.size());
    return k;
}

// --- step ----------------------------------------------------------------------------------------------

Step::Step(ggml_context * ctx_, const dsv4_hparams & hp_, std::vector<LayerState> & layers, const StepPlan & plan)
    : ctx(ctx_), hp(hp_), n_tokens(plan.n_tokens), n_group(plan.n_group), layers_(layers), plan_(plan) {
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
        in.cache_base = input(GGML_TYPE_I32, n_tokens);
        for (size_t k = size_t(n_group); k < plan_.segments.size(); ++k) {
            in.segment_rows.push_back(input(GGML_TYPE_I32, p.n_view));
        }
    }
    return in;
}

ggml_tensor * Step::kept_rows(ggml_tensor * batch, ggml_tensor * src, int64_t ring_rows) {
    // every segment no longer than the ring keeps every row, in order: no gather needed
    for (const Segment & sg : plan_.segments) {
        if (sg.n > ring_rows) {
            return ggml_get_rows(ctx, batch, src);
        }
    }
    return batch;
}

CompressorState & Step::state(uint32_t il, Stream st) {
    return st == Stream::INDEXER ? layers_[il].index : layers_[il].main;
}

namespace {

// rows [offset, offset + n) of a 2-D tensor (a view)
ggml_tensor * batch_rows(ggml_context * ctx, ggml_tensor * t, int64_t offset, int64_t n) {
    return ggml_view_2d(ctx, t, t->ne[0], n, t->nb[1], size_t(offset) * t->nb[1]);
}

}  // namespace

KeySet Step::window(uint32_t il, ggml_tensor * kv) {
    ggml_tensor * ring = layers_[il].window;
    ggml_tensor * kv2 = ggml_reshape_2d(ctx, kv, kv->ne[0], n_tokens);
    const int64_t R = plan_.window_rows;
    if (window_src_ == nullptr) {
        window_src_ = input(GGML_TYPE_I32, int64_t(plan_.window_src.size()));
        window_dst_ = input(GGML_TYPE_I64, int64_t(plan_.window_dst.size()));
        if (n_group > 0) {
            group_mask_ = input(GGML_TYPE_F32, R + 1, n_group);
            group_bases_ = input(GGML_TYPE_I32, 3, n_group);
        }
        for (size_t k = size_t(n_group); k < plan_.segments.size(); ++k) {
            const int64_t n = plan_.segments[k].n;
            segment_mask_.push_back(input(GGML_TYPE_F32, R + n, n));
            segment_ring_.push_back(input(GGML_TYPE_I32, R));
        }
    }
    KeySet keys;
    if (n_group > 0) {
        keys.group.ring = ring;
        keys.group.fresh = batch_rows(ctx, kv2, 0, n_group);
        keys.group.ring_mask = group_mask_;
        keys.group.bases = group_bases_;
    }
    for (size_t k = size_t(n_group); k < plan_.segments.size(); ++k) {
        const Segment & sg = plan_.segments[k];
        SegmentKeys sk;
        sk.offset = sg.offset;
        sk.n = sg.n;
        // its slot's ring rows, gathered (a view would bake the slot into the graph)
        ggml_tensor * own_ring = ggml_get_rows(ctx, ring, segment_ring_[k - size_t(n_group)]);
        sk.shared = ggml_concat(ctx, own_ring, batch_rows(ctx, kv2, sg.offset, sg.n), 1);
        sk.shared_mask = segment_mask_[k - size_t(n_group)];
        keys.segments.push_back(sk);
    }
    deferred_.push_back(ggml_set_rows(ctx, ring, kept_rows(kv2, window_src_, R), window_dst_));
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
        // pooling of the dummy blocks is dead code that ggml never computes
        return cache;
    }
    ggml_tensor * rows = ggml_reshape_2d(ctx, entries, entries->ne[0], entries->ne[2]);
    ggml_tensor * written = ggml_set_rows(ctx, cache, rows, in.write_rows);
    effects_.push_back(written);
    return written;  // attention reads the cache after the write
}

ggml_tensor * Step::indexer_scores(uint32_t, ggml_tensor * q, ggml_tensor * keys, ggml_tensor * w) {
    RatioInputs & in = inputs(Stream::INDEXER);
    return ops::indexer_scores(ctx, q, keys, w, in.visible_f16, in.cache_base);
}

KeySet Step::with_cache(const KeySet & keys, ggml_tensor * cache, Stream st) {
    RatioInputs & in = inputs(st);
    KeySet out = keys;
    if (out.group.ring != nullptr) {
        out.group.cache = cache;
        out.group.cache_mask = batch_rows(ctx, in.visible_f32, 0, n_group);
        out.group.cache_col = st == Stream::HCA ? 2 : 1;
    }
    for (size_t k = 0; k < out.segments.size(); ++k) {
        SegmentKeys & sk = out.segments[k];
        ggml_tensor * rows = ggml_get_rows(ctx, cache, in.segment_rows[k]);  // F32, whatever the cache type
        sk.shared = ggml_concat(ctx, sk.shared, rows, 1);
        sk.shared_mask = ggml_concat(ctx, sk.shared_mask, batch_rows(ctx, in.visible_f32, sk.offset, sk.n), 0);
    }
    return out;
}

KeySet Step::with_all(uint32_t, const KeySet & keys, ggml_tensor * cache) {
    return with_cache(keys, cache, Stream::HCA);
}

KeySet Step::with_selected(uint32_t, const KeySet & keys, ggml_tensor * cache, ggml_tensor * scores) {
    const int64_t n_view = scores->ne[0];
    const int64_t k = std::min<int64_t>(hp.indexer_top_k, n_view);
    if (k >= n_view) {
        // every visible block is selected (§3.6): plain causal attention over the cache view;
        // the indexer scores are then unused, and ggml never computes them
        return with_cache(keys, cache, Stream::CSA);
    }
    RatioInputs & in = inputs(Stream::CSA);
    KeySet out = keys;
    // ne{k, G} picks and their mask: picks of blocks the query cannot see (fewer than k visible)
    // have score -inf: step(s + 1e30) is 1 for any finite score and 0 for -inf; map 1 -> 0, 0 -> -1e30
    auto picks = [&](ggml_tensor * col_scores, int64_t n, bool selection) {
        ggml_tensor * top = selection ? ops::topk_rows(ctx, col_scores, k) : ggml_top_k(ctx, col_scores, int(k));
        ggml_tensor * picked_score = ggml_get_rows(ctx, ggml_reshape_3d(ctx, col_scores, 1, n_view, n), top);
        ggml_tensor * valid = ggml_step(ctx, ggml_scale_bias(ctx, picked_score, 1.0f, 1e30f));
        return std::pair<ggml_tensor *, ggml_tensor *>(top, ggml_reshape_2d(ctx, ggml_scale_bias(ctx, valid, 1e30f, -1e30f), k, n));
    };
    if (out.group.ring != nullptr) {
        // the decode group: the fused op reads the k picked entries of each query's slot in place
        // (on the CPU a selection, ties to the lower block, as the reference)
        const auto [top, mask] = picks(batch_rows(ctx, scores, 0, n_group), n_group, true);
        out.group.cache = cache;
        out.group.cache_idx = top;
        out.group.cache_mask = mask;
        out.group.cache_col = 1;
    }
    for (size_t i = 0; i < out.segments.size(); ++i) {
        SegmentKeys & sk = out.segments[i];
        ggml_tensor * seg_scores = batch_rows(ctx, scores, sk.offset, sk.n);
        ggml_tensor * rows = ggml_get_rows(ctx, cache, in.segment_rows[i]);  // F32 ne{d, n_view}
        if (sk.n == 1) {
            // one query (CUDA decode): gather its k picked entries
            const auto [top, mask] = picks(seg_scores, 1, cpu);
            ggml_tensor * picked = ggml_get_rows(ctx, rows, ggml_reshape_1d(ctx, top, k));
            sk.own = ggml_reshape_3d(ctx, picked, rows->ne[0], k, 1);
            sk.own_mask = mask;
            continue;
        }
        // several queries: each attends to the whole cache view through a mask that is 0 only at
        // its own picks (the scores are −inf at hidden blocks, which are never picked)
        sk.shared = ggml_concat(ctx, sk.shared, rows, 1);
        sk.shared_mask = ggml_concat(ctx, sk.shared_mask, ops::topk_mask(ctx, seg_scores, k), 0);
    }
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
    put(group_mask_, plan_.group_mask.data(), plan_.group_mask.size() * sizeof(float));
    put(group_bases_, plan_.group_bases.data(), plan_.group_bases.size() * sizeof(int32_t));
    for (size_t k = 0; k < segment_mask_.size(); ++k) {
        put(segment_mask_[k], plan_.segment_mask[k].data(), plan_.segment_mask[k].size() * sizeof(float));
        put(segment_ring_[k], plan_.segment_ring[k].data(), plan_.segment_ring[k].size() * sizeof(int32_t));
    }
    put(window_src_, plan_.window_src.data(), plan_.window_src.size() * sizeof(int32_t));
    put(window_dst_, plan_.window_dst.data(), plan_.window_dst.size() * sizeof(int64_t));
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
        put(in.cache_base, p.cache_base.data(), p.cache_base.size() * sizeof(int32_t));
        for (size_t k = 0; k < in.segment_rows.size(); ++k) {
            put(in.segment_rows[k], p.segment_rows.data() + k * size_t(p.n_view), size_t(p.n_view) * sizeof(int32_t));
        }
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
