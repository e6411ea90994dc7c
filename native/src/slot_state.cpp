#include "slot_state.h"

#include "error.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace dsv4 {

namespace {

constexpr int32_t kMaxSeq = 256;        // sequence slots per session (llama.cpp's LLAMA_MAX_SEQ)
constexpr int32_t kMaxSlack = 4096;     // ring rows kept beyond need, per slot
constexpr int32_t kMaxCheckpoints = 1024;

}  // namespace

// The persistent state of a session (§4.1), sized from n_ctx, the slots and the compress ratios:
// per layer a window ring; ratio 4: compressor rings (values and logits, 2·Dh wide) and n_ctx/4 + 1
// cache rows per slot, plus the same for the indexer (Di wide); ratio 128: rings and n_ctx/128 + 1
// cache rows per slot. The extra cache row takes the writes of dummy blocks; each compressor ring
// tensor ends with one synthetic row (value 0, logit -inf) that positions before 0 read.
// The compressor rings stay F32 (the reference keeps them in FP32, §4.1), and so do the raw
// windows, whose size does not grow with the context; the compressed caches, which do, take the
// session's cache type.
void for_each_state_tensor(const dsv4_hparams & hp, const Geometry & geo, ggml_type cache_type, bool mtp,
                           const std::function<void(uint32_t il, const char * name, ggml_type type, int64_t ne0,
                                                    int64_t ne1)> & fn) {
    const int64_t n = geo.n_slots;
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const int ratio = hp.compress_ratios[il];
        fn(il, "window", GGML_TYPE_F32, hp.head_dim, n * geo.window_rows);  // fixed size: always F32
        if (ratio != 0) {
            const int64_t c = ratio == 4 ? 2 : 1;
            const int64_t ring = ratio == 4 ? geo.ring4 : geo.ring128;
            fn(il, "comp_kv", GGML_TYPE_F32, c * hp.head_dim, n * ring + 1);
            fn(il, "comp_score", GGML_TYPE_F32, c * hp.head_dim, n * ring + 1);
            fn(il, "comp_cache", cache_type, hp.head_dim, n * (ratio == 4 ? geo.n_rows4 : geo.n_rows128));
        }
        if (ratio == 4) {
            fn(il, "index_kv", GGML_TYPE_F32, 2 * int64_t(hp.indexer_head_dim), n * geo.ring4 + 1);
            fn(il, "index_score", GGML_TYPE_F32, 2 * int64_t(hp.indexer_head_dim), n * geo.ring4 + 1);
            fn(il, "index_cache", cache_type, hp.indexer_head_dim, n * geo.n_rows4);
        }
    }
    if (mtp) {  // the MTP block (§3.10): a window-only layer, and the trunk's final streams it reads
        fn(hp.n_layer, "window", GGML_TYPE_F32, hp.head_dim, n * geo.window_rows);
        fn(hp.n_layer, "xfin", GGML_TYPE_F32, int64_t(hp.hc_mult) * hp.n_embd, n * geo.window_rows + 1);
    }
}

void check_session_params(const dsv4_hparams & hp, const dsv4_session_params & p) {
    if (p.n_ctx < 1) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "n_ctx must be at least 1, got %d", int(p.n_ctx));
    }
    if (uint32_t(p.n_ctx) > hp.n_ctx_train) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "n_ctx %d exceeds the model's context length %u (deepseek4.context_length)",
             int(p.n_ctx), unsigned(hp.n_ctx_train));
    }
    if (p.n_seq < 1 || p.n_seq > kMaxSeq) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "n_seq must be in [1, %d], got %d", int(kMaxSeq), int(p.n_seq));
    }
    if (p.n_rollback < 0 || p.n_rollback > kMaxSlack) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "n_rollback must be in [0, %d], got %d", int(kMaxSlack), int(p.n_rollback));
    }
    if (p.checkpoint_interval < 0) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "checkpoint_interval must be at least 0 (0: none), got %d",
             int(p.checkpoint_interval));
    }
    if (p.n_checkpoints < 0 || p.n_checkpoints > kMaxCheckpoints) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "n_checkpoints must be in [0, %d], got %d", int(kMaxCheckpoints),
             int(p.n_checkpoints));
    }
    if (p.mtp && hp.n_nextn == 0) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "mtp: this model has no MTP block (deepseek4.nextn_predict_layers is 0)");
    }
    const int32_t type = p.cache_type;
    if (type != GGML_TYPE_F32 && type != GGML_TYPE_F16 && type != GGML_TYPE_BF16 && type != GGML_TYPE_Q8_0) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "cache type %d is not supported (f32, f16, bf16, q8_0)", int(type));
    }
    const int64_t blck = ggml_blck_size(ggml_type(type));
    if (hp.head_dim % blck != 0 || hp.indexer_head_dim % blck != 0) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "cache type %s needs head dims that are multiples of %lld",
             ggml_type_name(ggml_type(type)), (long long) blck);
    }
}

uint64_t state_bytes(const dsv4_hparams & hp, const dsv4_session_params & params, uint64_t * per_slot) {
    check_session_params(hp, params);
    // the sizes come from the file's hyperparameters (head dims, sliding window): with hostile
    // values they overflow 64 bits, and ggml would size a tensor by the wrapped-around product
    const auto total_for = [&](int64_t n_slots) {
        const Geometry geo = make_geometry(hp, params.n_ctx, n_slots, params.n_rollback);
        uint64_t total = 0;
        bool overflow = false;
        for_each_state_tensor(hp, geo, ggml_type(params.cache_type), params.mtp,
                              [&](uint32_t, const char *, ggml_type type, int64_t ne0, int64_t ne1) {
            uint64_t bytes = 0;
            overflow = overflow || __builtin_mul_overflow(uint64_t(ggml_row_size(type, ne0)), uint64_t(ne1), &bytes) ||
                       bytes > (uint64_t(1) << 62) || __builtin_add_overflow(total, GGML_PAD(bytes, 32), &total);
        });
        if (overflow || total > (uint64_t(1) << 62)) {
            fail(DSV4_ERR_OUT_OF_MEMORY,
                 "the session state for n_ctx %d and %lld sequences would need more than 2^62 bytes "
                 "(attention.key_length %u, attention.sliding_window %u)", int(params.n_ctx), (long long) n_slots,
                 unsigned(hp.head_dim), unsigned(hp.n_swa));
        }
        return total;
    };
    const uint64_t total = total_for(params.n_seq);
    if (per_slot != nullptr) {
        // what one more slot adds (the synthetic rows and the padding are shared)
        *per_slot = params.n_seq > 1 ? (total - total_for(1)) / uint64_t(params.n_seq - 1) : total_for(2) - total;
    }
    return total;
}

// ring rows per slot of each kind
int64_t ring_rows(const Geometry & geo, RingKind kind) {
    return kind == WINDOW ? geo.window_rows : kind == RATIO4 ? geo.ring4 : geo.ring128;
}

std::vector<RingRef> rings(const dsv4_session & s) {
    std::vector<RingRef> out;
    for (uint32_t il = 0; il < s.layers.size(); ++il) {
        const LayerState & L = s.layers[il];
        out.push_back({L.window, ring_rows(s.geo, WINDOW), WINDOW, false});
        if (L.xfin != nullptr) {
            out.push_back({L.xfin, ring_rows(s.geo, WINDOW), WINDOW, false});
        }
        const int ratio = s.model->hp.compress_ratios[il];
        for (const CompressorState * cs : {&L.main, &L.index}) {  // the indexer's: ratio 4
            if (cs->kv != nullptr) {
                const RingKind kind = ratio == 4 ? RATIO4 : RATIO128;
                out.push_back({cs->kv, ring_rows(s.geo, kind), kind, false});
                out.push_back({cs->score, ring_rows(s.geo, kind), kind, true});
            }
        }
    }
    return out;
}

std::vector<CacheRef> caches(const dsv4_session & s) {
    std::vector<CacheRef> out;
    for (uint32_t il = 0; il < s.layers.size(); ++il) {
        const int ratio = s.model->hp.compress_ratios[il];
        const LayerState & L = s.layers[il];
        if (L.main.cache != nullptr) {
            out.push_back({L.main.cache, ratio == 4 ? s.geo.n_rows4 : s.geo.n_rows128, ratio});
        }
        if (L.index.cache != nullptr) {
            out.push_back({L.index.cache, s.geo.n_rows4, 4});
        }
    }
    return out;
}

// The first position whose ring rows a sequence at n needs (with `slack`: that many tokens
// earlier, so that it can still be rolled back by them): the window's last n_swa − 1 tokens,
// the overlapping compressors' previous and current block, the HCA compressor's current block.
int64_t ring_start(const dsv4_hparams & hp, RingKind kind, int64_t n, int64_t slack) {
    const int64_t m = std::max<int64_t>(0, n - slack);
    switch (kind) {
        case WINDOW: return std::max<int64_t>(0, m - (int64_t(hp.n_swa) - 1));
        case RATIO4: return std::max<int64_t>(0, m / 4 * 4 - 4);
        case RATIO128: return m / 128 * 128;
    }
    return 0;
}

int64_t & ring_lo(SeqSlot & sl, RingKind kind) {
    return kind == WINDOW ? sl.lo_window : kind == RATIO4 ? sl.lo4 : sl.lo128;
}

int64_t ring_lo(const SeqSlot & sl, RingKind kind) {
    return kind == WINDOW ? sl.lo_window : kind == RATIO4 ? sl.lo4 : sl.lo128;
}

// Copies positions [start, n) of every ring of `slot` out to `dst` (nullptr: only counts the
// bytes), ring by ring in layer order; returns the bytes.
size_t rings_get(const dsv4_session & s, int32_t slot, int64_t n, int64_t slack, uint8_t * dst) {
    size_t off = 0;
    for (const RingRef & r : rings(s)) {
        const int64_t first = ring_start(s.model->hp, r.kind, n, slack);
        ring_runs(slot, r.rows, first, n, [&](int64_t row, int64_t count, int64_t) {
            const size_t bytes = size_t(count) * r.t->nb[1];
            if (dst != nullptr) {
                ggml_backend_tensor_get(r.t, dst + off, size_t(row) * r.t->nb[1], bytes);
            }
            off += bytes;
        });
    }
    return off;
}

// The inverse of rings_get; afterwards the slot's rings hold its rows intact from those positions.
size_t rings_set(dsv4_session & s, int32_t slot, int64_t n, int64_t slack, const uint8_t * src) {
    size_t off = 0;
    SeqSlot & sl = s.slots[size_t(slot)];
    for (const RingRef & r : rings(s)) {
        const int64_t first = ring_start(s.model->hp, r.kind, n, slack);
        ring_runs(slot, r.rows, first, n, [&](int64_t row, int64_t count, int64_t) {
            const size_t bytes = size_t(count) * r.t->nb[1];
            ggml_backend_tensor_set(r.t, src + off, size_t(row) * r.t->nb[1], bytes);
            off += bytes;
        });
        ring_lo(sl, r.kind) = first;
    }
    return off;
}

// Bytes of cache rows [0, n/r) of every compressed cache of a slot (the entries of the blocks a
// sequence at n has completed).
size_t caches_io(const dsv4_session & s, int32_t slot, int64_t n, uint8_t * get, const uint8_t * set) {
    size_t off = 0;
    for (const CacheRef & c : caches(s)) {
        const size_t bytes = size_t(n / c.ratio) * c.t->nb[1];
        const size_t at = size_t(slot) * size_t(c.rows) * c.t->nb[1];
        if (get != nullptr && bytes > 0) {
            ggml_backend_tensor_get(c.t, get + off, at, bytes);
        }
        if (set != nullptr && bytes > 0) {
            ggml_backend_tensor_set(c.t, set + off, at, bytes);
        }
        off += bytes;
    }
    return off;
}

void fill_rows(ggml_tensor * t, int64_t row0, int64_t n_rows, float value) {
    if (n_rows <= 0) {
        return;
    }
    const size_t off = size_t(row0) * t->nb[1], bytes = size_t(n_rows) * t->nb[1];
    if (value == 0.0f) {
        ggml_backend_tensor_memset(t, 0, off, bytes);
        return;
    }
    std::vector<float> v(bytes / sizeof(float), value);
    ggml_backend_tensor_set(t, v.data(), off, bytes);
}

// Empties slot `slot`: zero rings and caches, -inf gate logits (ring rows no token has written
// must get weight exactly 0 in the pooling, §4.2, §7 #29); no tokens, no checkpoints.
void clear_slot(dsv4_session & s, int32_t slot) {
    for (const RingRef & r : rings(s)) {
        fill_rows(r.t, slot * r.rows, r.rows, r.score ? -INFINITY : 0.0f);
    }
    for (const CacheRef & c : caches(s)) {
        fill_rows(c.t, slot * c.rows, c.rows, 0.0f);
    }
    s.slots[size_t(slot)] = SeqSlot{};
}

// Whether sequence `sl` can go on from position n < n_past with the rows its rings hold now.
bool rings_hold(const dsv4_session & s, const SeqSlot & sl, int64_t n) {
    for (RingKind kind : {WINDOW, RATIO4, RATIO128}) {
        if ((kind == RATIO4 && !s.geo.has4) || (kind == RATIO128 && !s.geo.has128)) {
            continue;
        }
        if (ring_start(s.model->hp, kind, n, 0) < ring_lo(sl, kind)) {
            return false;
        }
    }
    return true;
}

void check_seq(const dsv4_session & s, int32_t seq, const char * what) {
    if (seq < 0 || seq >= int32_t(s.slots.size())) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "%s: sequence %d does not exist (the session has %d: 0 … %d)", what, int(seq),
             int(s.slots.size()), int(s.slots.size()) - 1);
    }
}

}  // namespace dsv4
