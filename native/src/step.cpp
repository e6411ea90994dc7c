// The runtime side of a micro-batch's graph: its inputs, each layer's key sets (windows,
// compressor rings, compressed caches of every sequence in the batch) and the deferred ring
// writes; the generated blocks call these through `s.*`.
#include "step.h"

#include "ops.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cmath>

namespace dsv4 {

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

void Step::window_inputs() {
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
}

KeySet Step::window(uint32_t il, ggml_tensor * kv) {
    ggml_tensor * ring = layers_[il].window;
    ggml_tensor * kv2 = ggml_reshape_2d(ctx, kv, kv->ne[0], n_tokens);
    const int64_t R = plan_.window_rows;
    window_inputs();
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

ggml_tensor * Step::mtp_prev(uint32_t il, ggml_tensor * X) {
    // the ring rows of the segments' first tokens only (the ring holds every slot's window)
    mtp_ring_ = input(GGML_TYPE_I32, n_tokens);
    ggml_tensor * rows = ggml_get_rows(ctx, layers_[il].xfin, mtp_ring_);
    if (X != nullptr) {
        mtp_prev_ = input(GGML_TYPE_I32, n_tokens);
        rows = ggml_get_rows(ctx, ggml_concat(ctx, rows, ggml_reshape_2d(ctx, X, X->ne[0] * X->ne[1], n_tokens), 1),
                             mtp_prev_);
    }
    return ggml_reshape_3d(ctx, rows, int64_t(hp.n_embd), int64_t(hp.hc_mult), n_tokens);
}

void Step::keep_final(uint32_t il, ggml_tensor * X) {
    window_inputs();
    ggml_tensor * flat = ggml_reshape_2d(ctx, X, X->ne[0] * X->ne[1], n_tokens);
    // where the window keeps its kv: the same rows of the same ring geometry
    deferred_.push_back(ggml_set_rows(ctx, layers_[il].xfin, kept_rows(flat, window_src_, plan_.window_rows),
                                      window_dst_));
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
    put(mtp_ring_, plan_.mtp_ring.data(), plan_.mtp_ring.size() * sizeof(int32_t));
    put(mtp_prev_, plan_.mtp_prev.data(), plan_.mtp_prev.size() * sizeof(int32_t));
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
