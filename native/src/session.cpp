#include "session.h"

#include "backend.h"
#include "error.h"
#include "profile.h"
#include "slot_state.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

namespace dsv4 {

namespace {

int default_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : int(n);
}

// --- micro-batches ----------------------------------------------------------------------------------

// Where a micro-batch's logits go: those of batch row `row`, to `dst`.
struct OutRow {
    int32_t row;
    float * dst;
    float * mtp_dst;   // the MTP block's logits of the row, or nullptr
};

int kind_index(RingKind kind) {
    return kind == WINDOW ? 0 : kind == RATIO4 ? 1 : 2;
}

// Whether restoring checkpoint `c` leaves intact every ring row a sequence at n needs.
bool checkpoint_reaches(const dsv4_session & s, const Checkpoint & c, int64_t n) {
    for (RingKind kind : {WINDOW, RATIO4, RATIO128}) {
        if ((kind == RATIO4 && !s.geo.has4) || (kind == RATIO128 && !s.geo.has128)) {
            continue;
        }
        if (ring_start(s.model->hp, kind, n, 0) < c.lo[kind_index(kind)]) {
            return false;
        }
    }
    return true;
}

// Copies the ring rows sequence `slot` needs to go on from here (with the rollback slack) out to
// host memory. Over n_checkpoints, the oldest interval checkpoint goes first, then the oldest
// prompt one: a thinking-mode chat's next turn goes back to just before where its last prompt ended.
void take_checkpoint(dsv4_session & s, int32_t slot, bool prompt) {
    SeqSlot & sl = s.slots[size_t(slot)];
    if (s.params.n_checkpoints == 0 || (!sl.checkpoints.empty() && sl.checkpoints.back().pos == sl.n_past)) {
        return;
    }
    Checkpoint c;
    c.pos = sl.n_past;
    c.prompt = prompt;
    for (RingKind kind : {WINDOW, RATIO4, RATIO128}) {
        c.lo[kind_index(kind)] = std::max(ring_start(s.model->hp, kind, sl.n_past, s.geo.slack), ring_lo(sl, kind));
    }
    c.rings.resize(rings_get(s, slot, sl.n_past, s.geo.slack, nullptr));
    rings_get(s, slot, sl.n_past, s.geo.slack, c.rings.data());
    sl.checkpoints.push_back(std::move(c));
    if (int64_t(sl.checkpoints.size()) > s.params.n_checkpoints) {
        auto victim = std::find_if(sl.checkpoints.begin(), sl.checkpoints.end(), [](const Checkpoint & k) { return !k.prompt; });
        sl.checkpoints.erase(victim != sl.checkpoints.end() ? victim : sl.checkpoints.begin());
    }
}

// Runs graph g (its inputs set); on a backend failure every cached graph goes.
void compute(dsv4_session & s, CachedGraph & g, const char * what) {
    if (ggml_backend_sched_graph_compute(s.sched.get(), g.graph) != GGML_STATUS_SUCCESS) {
        s.current = nullptr;
        s.allocated = nullptr;
        s.graphs.clear();
        fail(DSV4_ERR_BACKEND, "the backend failed to compute %s", what);
    }
}

// Computes one micro-batch: `segs` in batch order (the decode group's one-token segments first),
// `tokens` the batch; then advances every segment's sequence.
void run_ubatch(dsv4_session & s, const std::vector<Segment> & segs, int64_t n_group, const std::vector<int32_t> & tokens,
                const std::vector<OutRow> & outs) {
    const dsv4_hparams & hp = s.model->hp;
    std::vector<int32_t> out_rows;
    for (const OutRow & o : outs) {
        out_rows.push_back(o.row);
    }
    s.plan = make_plan(hp, s.geo, segs, n_group, tokens.data(), out_rows);
    GraphKey key = graph_key(s.plan);
    key.mtp_out = std::any_of(outs.begin(), outs.end(), [](const OutRow & o) { return o.mtp_dst != nullptr; });
    CachedGraph & g = graph_for(s, key);
    s.current = &g;
    g.step->set_inputs();
    if (g.out_rows != nullptr) {
        ggml_backend_tensor_set(g.out_rows, out_rows.data(), 0, out_rows.size() * sizeof(int32_t));
    }
    if (s.profile != nullptr) {
        const bool decode = std::all_of(segs.begin(), segs.end(), [](const Segment & sg) { return sg.n == 1; });
        s.profile->phase = decode ? "decode" : "prefill";
        s.profile->skip = ++g.n_runs <= 2;
        s.profile->steps[s.profile->phase] += s.profile->skip ? 0 : 1;
    }
    compute(s, g, "the graph");
    for (const Segment & sg : segs) {
        SeqSlot & sl = s.slots[size_t(sg.slot)];
        sl.n_past += sg.n;
        sl.tokens.insert(sl.tokens.end(), tokens.begin() + sg.offset, tokens.begin() + sg.offset + sg.n);
        for (RingKind kind : {WINDOW, RATIO4, RATIO128}) {  // what the new rows overwrote
            ring_lo(sl, kind) = std::max(ring_lo(sl, kind), sl.n_past - ring_rows(s.geo, kind));
        }
        const int64_t last = sl.checkpoints.empty() ? 0 : sl.checkpoints.back().pos;
        if (s.params.checkpoint_interval > 0 &&
            sl.n_past / s.params.checkpoint_interval > last / s.params.checkpoint_interval) {
            take_checkpoint(s, sg.slot, false);
        }
    }
    s.n_ubatches += 1;
    float health = 0.0f;
    ggml_backend_tensor_get(g.health, &health, 0, sizeof(health));
    bool finite = std::isfinite(health);
    const size_t row_bytes = size_t(hp.n_vocab) * sizeof(float);
    for (size_t i = 0; i < outs.size(); ++i) {
        ggml_backend_tensor_get(g.logits, outs[i].dst, i * row_bytes, row_bytes);
        for (uint32_t v = 0; v < hp.n_vocab && finite; ++v) {
            finite = std::isfinite(outs[i].dst[v]);
        }
        if (outs[i].mtp_dst != nullptr) {
            ggml_backend_tensor_get(g.mtp_logits, outs[i].mtp_dst, i * row_bytes, row_bytes);
            for (uint32_t v = 0; v < hp.n_vocab && finite; ++v) {
                finite = std::isfinite(outs[i].mtp_dst[v]);
            }
        }
    }
    if (!finite) {
        std::string where;
        for (const Segment & sg : segs) {
            where += format("%s sequence %d positions %lld..%lld", where.empty() ? "" : ",", int(sg.slot),
                            (long long) sg.pos0, (long long) (sg.pos0 + sg.n - 1));
        }
        fail(DSV4_ERR_NUMERICS,
             "non-finite values (NaN/Inf) appeared while computing%s; the state of these sequences may hold them "
             "now: reset them", where.c_str());
    }
}

}  // namespace

std::unique_ptr<dsv4_session> create_session(dsv4_model * model, const dsv4_session_params & params) {
    const dsv4_hparams & hp = model->hp;
    check_session_params(hp, params);
    if (params.n_ubatch < 1) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "n_ubatch must be at least 1, got %d", int(params.n_ubatch));
    }
    auto s = std::make_unique<dsv4_session>();
    s->model = model;
    s->params = params;
    s->params.n_ubatch = std::min(params.n_ubatch, params.n_ctx * params.n_seq);
    s->params.n_threads = params.n_threads > 0 ? params.n_threads : (model->params.n_threads > 0
                                                                        ? model->params.n_threads : default_threads());

    s->backend.reset(make_backend(model->params.backend, s->params.n_threads));
    if (model->params.backend != DSV4_BACKEND_CPU) {
        s->cpu.reset(make_backend(DSV4_BACKEND_CPU, s->params.n_threads));
    }

    // state tensors, sized from n_ctx, the slots and the compress ratios (§4.1)
    s->geo = make_geometry(hp, params.n_ctx, params.n_seq, params.n_rollback);
    const size_t n_tensors = size_t(hp.n_layer) * 7 + 3;
    s->ctx_state.reset(ggml_init({ggml_tensor_overhead() * n_tensors, nullptr, true}));
    s->layers.resize(hp.n_layer + (params.mtp ? 1 : 0));
    state_bytes(hp, params);  // checks that the sizes do not overflow
    for_each_state_tensor(hp, s->geo, ggml_type(params.cache_type), params.mtp,
                          [&](uint32_t il, const char * name, ggml_type type, int64_t ne0, int64_t ne1) {
        LayerState & L = s->layers[il];
        ggml_tensor * t = ggml_new_tensor_2d(s->ctx_state.get(), type, ne0, ne1);
        ggml_format_name(t, "%s.%u", name, unsigned(il));
        const std::string n = name;
        ggml_tensor ** slot = n == "window" ? &L.window
                            : n == "xfin" ? &L.xfin
                            : n == "comp_kv" ? &L.main.kv
                            : n == "comp_score" ? &L.main.score
                            : n == "comp_cache" ? &L.main.cache
                            : n == "index_kv" ? &L.index.kv
                            : n == "index_score" ? &L.index.score
                                                 : &L.index.cache;
        *slot = t;
    });
    s->buf_state.reset(ggml_backend_alloc_ctx_tensors(s->ctx_state.get(), s->backend.get()));
    if (s->buf_state == nullptr) {
        fail(DSV4_ERR_OUT_OF_MEMORY, "cannot allocate the session state for n_ctx %d and %d sequences",
             int(params.n_ctx), int(params.n_seq));
    }
    ggml_backend_buffer_clear(s->buf_state.get(), 0);
    s->slots.resize(size_t(params.n_seq));
    for (const RingRef & r : rings(*s)) {
        if (r.score) {  // every slot's unwritten rows and the synthetic row: logit -inf
            fill_rows(r.t, 0, r.t->ne[1], -INFINITY);
        }
    }
    if (std::getenv("DSV4_PROFILE") != nullptr) {
        s->profile = std::make_shared<OpProfile>();
    }

    return s;
}

void session_eval_batch(dsv4_session & s, const SeqRequest * req, int64_t n_req) {
    const dsv4_hparams & hp = s.model->hp;
    if (n_req < 1) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "eval_batch needs at least one sequence");
    }
    std::vector<bool> seen(s.slots.size(), false);
    for (int64_t r = 0; r < n_req; ++r) {
        const SeqRequest & q = req[r];
        check_seq(s, q.seq, "eval");
        if (seen[size_t(q.seq)]) {
            fail(DSV4_ERR_INVALID_ARGUMENT, "eval: sequence %d appears twice in one batch", int(q.seq));
        }
        seen[size_t(q.seq)] = true;
        if (q.n_tokens < 1) {
            fail(DSV4_ERR_INVALID_ARGUMENT, "eval needs at least one token (sequence %d)", int(q.seq));
        }
        if (q.tokens == nullptr) {
            fail(DSV4_ERR_INVALID_ARGUMENT, "eval: sequence %d has no token array", int(q.seq));
        }
        for (int64_t i = 0; i < q.n_tokens; ++i) {
            if (q.tokens[i] < 0 || uint32_t(q.tokens[i]) >= hp.n_vocab) {
                fail(DSV4_ERR_INVALID_ARGUMENT, "token %lld at index %lld (sequence %d) is outside the vocabulary [0, %u)",
                     (long long) q.tokens[i], (long long) i, int(q.seq), unsigned(hp.n_vocab));
            }
        }
        const int64_t n_past = s.slots[size_t(q.seq)].n_past;
        if (n_past + q.n_tokens > s.params.n_ctx) {
            fail(DSV4_ERR_CONTEXT_OVERFLOW, "%lld tokens do not fit in sequence %d: %lld of n_ctx %d are used",
                 (long long) q.n_tokens, int(q.seq), (long long) n_past, int(s.params.n_ctx));
        }
        if (q.out_rows != 0 && q.out_rows != 1 && q.out_rows != q.n_tokens) {
            fail(DSV4_ERR_INVALID_ARGUMENT, "out_rows must be 0, 1 or the token count");
        }
        if (q.out_rows > 0 && q.logits == nullptr) {
            fail(DSV4_ERR_INVALID_ARGUMENT, "eval: sequence %d asks for logits but gives no buffer", int(q.seq));
        }
        if (q.mtp_logits != nullptr && !s.params.mtp) {
            fail(DSV4_ERR_INVALID_ARGUMENT, "eval: MTP logits need a session created with mtp");
        }
    }
    // Micro-batches of at most n_ubatch tokens, filled in request order with one-token requests
    // first (every step of a server's decoding sequences carries them all); a long request is
    // split over several micro-batches, in order.
    std::vector<int64_t> order;
    for (int pass = 0; pass < 2; ++pass) {
        for (int64_t r = 0; r < n_req; ++r) {
            if ((req[r].n_tokens == 1) == (pass == 0)) {
                order.push_back(r);
            }
        }
    }
    std::vector<int64_t> done(size_t(n_req), 0);
    const int64_t nb = s.params.n_ubatch;
    const bool group = s.cpu == nullptr;  // the fused decode op is a CPU path
    for (;;) {
        struct Chunk {
            int64_t r, i0, n;
        };
        std::vector<Chunk> chunks;
        int64_t budget = nb;
        for (int64_t r : order) {
            const int64_t left = req[r].n_tokens - done[size_t(r)];
            if (left > 0 && budget > 0) {
                const int64_t n = std::min(left, budget);
                chunks.push_back({r, done[size_t(r)], n});
                budget -= n;
            }
        }
        if (chunks.empty()) {
            break;
        }
        // one-token chunks first: the decode group
        std::stable_partition(chunks.begin(), chunks.end(), [&](const Chunk & c) { return group && c.n == 1; });
        std::vector<Segment> segs;
        std::vector<int32_t> tokens;
        std::vector<OutRow> outs;
        int64_t n_group = 0;
        for (const Chunk & c : chunks) {
            const SeqRequest & q = req[c.r];
            Segment sg;
            sg.slot = q.seq;
            sg.pos0 = s.slots[size_t(q.seq)].n_past;
            sg.n = c.n;
            sg.offset = int64_t(tokens.size());
            n_group += group && c.n == 1;
            tokens.insert(tokens.end(), q.tokens + c.i0, q.tokens + c.i0 + c.n);
            if (q.out_rows == q.n_tokens) {
                for (int64_t i = 0; i < c.n; ++i) {
                    const int64_t at = (c.i0 + i) * int64_t(hp.n_vocab);
                    outs.push_back({int32_t(sg.offset + i), q.logits + at, q.mtp_logits ? q.mtp_logits + at : nullptr});
                }
            } else if (q.out_rows == 1 && c.i0 + c.n == q.n_tokens) {
                outs.push_back({int32_t(sg.offset + c.n - 1), q.logits, q.mtp_logits});
            }
            segs.push_back(sg);
            done[size_t(c.r)] += c.n;
        }
        run_ubatch(s, segs, n_group, tokens, outs);
        for (const Chunk & c : chunks) {
            if (req[c.r].n_tokens > 1 && c.i0 + c.n == req[c.r].n_tokens) {
                take_checkpoint(s, req[c.r].seq, true);  // the end of a prompt
            }
        }
    }
}

void session_mtp_draft(dsv4_session & s, int32_t seq, int32_t token, int64_t offset, float * logits) {
    const dsv4_hparams & hp = s.model->hp;
    if (!s.params.mtp) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "mtp_draft needs a session created with mtp");
    }
    check_seq(s, seq, "mtp_draft");
    if (token < 0 || uint32_t(token) >= hp.n_vocab) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "mtp_draft: token %d is outside the vocabulary [0, %u)", int(token),
             unsigned(hp.n_vocab));
    }
    SeqSlot & sl = s.slots[size_t(seq)];
    if (offset < 0 || offset >= s.geo.slack) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "mtp_draft: offset %lld is outside [0, n_rollback = %lld)", (long long) offset,
             (long long) s.geo.slack);
    }
    const int64_t pos = sl.n_past + offset;
    if (pos >= s.params.n_ctx) {
        fail(DSV4_ERR_CONTEXT_OVERFLOW, "mtp_draft: position %lld is past n_ctx %d", (long long) pos, int(s.params.n_ctx));
    }
    if (sl.n_past == 0) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "mtp_draft: sequence %d is empty (the draft row needs the trunk's state)", int(seq));
    }
    Segment sg;
    sg.slot = seq;
    sg.pos0 = pos;
    sg.n = 1;
    s.plan = make_plan(hp, s.geo, {sg}, 0, &token, {0});
    GraphKey key = graph_key(s.plan);
    key.mtp_only = true;
    CachedGraph & g = graph_for(s, key);
    s.current = &g;
    g.step->set_inputs();
    compute(s, g, "the MTP draft step");
    // the row overwrote the MTP rings' rows of position pos − R: a rollback below it recomputes
    ring_lo(sl, WINDOW) = std::max(ring_lo(sl, WINDOW), pos + 1 - s.geo.window_rows);
    ggml_backend_tensor_get(g.logits, logits, 0, size_t(hp.n_vocab) * sizeof(float));
}

namespace {

// Forgets the tokens of `sl` from n on (their ring and cache rows are stale: nothing reads them
// before later tokens overwrite them), and the checkpoints past n.
void cut(SeqSlot & sl, int64_t n) {
    sl.n_past = n;
    sl.tokens.resize(size_t(n));
    while (!sl.checkpoints.empty() && sl.checkpoints.back().pos > n) {
        sl.checkpoints.pop_back();
    }
}

}  // namespace

void session_truncate(dsv4_session & s, int32_t seq, int64_t n) {
    check_seq(s, seq, "truncate");
    SeqSlot & sl = s.slots[size_t(seq)];
    if (n < 0 || n > sl.n_past) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "truncate: cannot keep %lld tokens of sequence %d, which holds %lld",
             (long long) n, int(seq), (long long) sl.n_past);
    }
    if (n == sl.n_past) {
        return;
    }
    if (rings_hold(s, sl, n)) {  // O(1)
        cut(sl, n);
        return;
    }
    // Further back than the rings reach: restore the checkpoint that leaves the least to
    // recompute: one at or after n whose slack reaches back to n (nothing), else the latest before
    // n, else none (position 0). A checkpoint's tokens are a prefix of the sequence held, and the
    // cache rows of the blocks completed before it have not changed since it was taken (going
    // back further would have dropped it).
    const std::vector<int32_t> tokens = sl.tokens;
    const Checkpoint * best = nullptr;
    for (const Checkpoint & c : sl.checkpoints) {
        if (c.pos >= n && c.pos - s.geo.slack <= n && checkpoint_reaches(s, c, n)) {
            best = &c;
            break;
        }
    }
    for (size_t i = 0; best == nullptr && i < sl.checkpoints.size(); ++i) {
        const Checkpoint & c = sl.checkpoints[sl.checkpoints.size() - 1 - i];  // the latest at or before n
        best = c.pos <= n && checkpoint_reaches(s, c, c.pos) ? &c : nullptr;
    }
    s.n_restores += 1;
    if (best == nullptr) {
        clear_slot(s, seq);
    } else {
        const Checkpoint chosen = *best;
        cut(sl, std::max(n, chosen.pos));  // the checkpoints past both go
        rings_set(s, seq, chosen.pos, s.geo.slack, chosen.rings.data());
        for (RingKind kind : {WINDOW, RATIO4, RATIO128}) {   // rows it copied stale stay stale
            ring_lo(sl, kind) = std::max(ring_lo(sl, kind), chosen.lo[kind_index(kind)]);
        }
        sl.n_past = chosen.pos;
        sl.tokens.assign(tokens.begin(), tokens.begin() + chosen.pos);
        if (chosen.pos > n) {
            if (!rings_hold(s, sl, n)) {
                fail(DSV4_ERR_INTERNAL, "truncate: checkpoint %lld does not reach back to %lld", (long long) chosen.pos,
                     (long long) n);
            }
            cut(sl, n);
            return;
        }
    }
    if (sl.n_past < n) {  // recompute the gap, computing no logits
        const SeqRequest q{seq, tokens.data() + sl.n_past, n - sl.n_past, nullptr, 0, nullptr};
        s.n_reevaluated += q.n_tokens;
        session_eval_batch(s, &q, 1);
    }
}

void session_copy_seq(dsv4_session & s, int32_t src, int32_t dst) {
    check_seq(s, src, "copy_seq");
    check_seq(s, dst, "copy_seq");
    if (src == dst) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "copy_seq: the source and the destination are both sequence %d", int(src));
    }
    // every ring row of the slot (so that the copy can be rolled back like the original) and the
    // cache rows of the completed blocks
    std::vector<uint8_t> buf;
    for (const RingRef & r : rings(s)) {
        const size_t bytes = size_t(r.rows) * r.t->nb[1];
        buf.resize(bytes);
        ggml_backend_tensor_get(r.t, buf.data(), size_t(src) * bytes, bytes);
        ggml_backend_tensor_set(r.t, buf.data(), size_t(dst) * bytes, bytes);
    }
    const SeqSlot & from = s.slots[size_t(src)];
    for (const CacheRef & c : caches(s)) {
        const size_t bytes = size_t(from.n_past / c.ratio) * c.t->nb[1];
        if (bytes > 0) {
            buf.resize(bytes);
            ggml_backend_tensor_get(c.t, buf.data(), size_t(src) * size_t(c.rows) * c.t->nb[1], bytes);
            ggml_backend_tensor_set(c.t, buf.data(), size_t(dst) * size_t(c.rows) * c.t->nb[1], bytes);
        }
    }
    s.slots[size_t(dst)] = from;
}

void session_reset(dsv4_session & s, int32_t seq) {
    if (seq < 0) {
        for (int32_t i = 0; i < int32_t(s.slots.size()); ++i) {
            clear_slot(s, i);
        }
        return;
    }
    check_seq(s, seq, "reset");
    clear_slot(s, seq);
}

const SeqSlot & session_slot(const dsv4_session & s, int32_t seq) {
    check_seq(s, seq, "sequence");
    return s.slots[size_t(seq)];
}

dsv4_session_stats session_stats(const dsv4_session & s) {
    dsv4_session_stats st{};
    st.n_seq = int32_t(s.slots.size());
    st.n_past = s.slots[0].n_past;
    st.n_ubatches = s.n_ubatches;
    st.n_graph_builds = s.n_graph_builds;
    st.n_graph_nodes = s.current != nullptr ? ggml_graph_n_nodes(s.current->graph) : 0;
    st.state_bytes = ggml_backend_buffer_get_size(s.buf_state.get());
    state_bytes(s.model->hp, s.params, &st.slot_state_bytes);
    for (const SeqSlot & sl : s.slots) {
        for (const Checkpoint & c : sl.checkpoints) {
            st.checkpoint_bytes += c.rings.size();
        }
    }
    st.n_restores = s.n_restores;
    st.n_reevaluated = s.n_reevaluated;
    if (s.sched != nullptr) {
        st.compute_bytes_all = ggml_backend_sched_get_buffer_size(s.sched.get(), s.backend.get());
    }
    if (s.current != nullptr) {
        st.compute_bytes = s.current->compute_bytes;
    }
    if (s.current != nullptr && s.allocated == s.current) {
        st.n_graph_splits = ggml_backend_sched_get_n_splits(s.sched.get());
        st.n_graph_copies = ggml_backend_sched_get_n_copies(s.sched.get());
    }
    return st;
}

}  // namespace dsv4

dsv4_session::~dsv4_session() {
    current = nullptr;
    allocated = nullptr;
    graphs.clear();
    if (profile != nullptr) {
        dsv4::print_profile(*profile);
    }
}
