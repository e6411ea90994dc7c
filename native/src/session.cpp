#include "session.h"

#include "backend.h"

#include "blocks.h"
#include "error.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <thread>

namespace dsv4 {

constexpr size_t kMaxCachedGraphs = 6;
constexpr int32_t kMaxSeq = 256;        // sequence slots per session (llama.cpp's LLAMA_MAX_SEQ)
constexpr int32_t kMaxSlack = 4096;     // ring rows kept beyond need, per slot
constexpr int32_t kMaxCheckpoints = 1024;

struct OpProfile {
    struct Row {
        double seconds = 0;
        int64_t nodes = 0;
    };
    const char * phase = "prefill";                  // "decode": one-token micro-batches
    bool skip = false;                               // a graph's first two runs (one-time costs) are not counted
    std::map<std::string, int64_t> steps;           // micro-batches per phase
    std::map<std::string, std::map<std::string, Row>> ops, blocks;  // phase → op / block·op
    std::map<std::string, std::map<std::string, Row>> shapes;       // phase → block·op·operand shapes
    std::chrono::steady_clock::time_point t0;
    std::string op, block;
};


namespace {

int default_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : int(n);
}


// DSV4_GRAPH_STATS=1: per-op node counts of every graph built (for profiling work)
void print_graph_stats(ggml_cgraph * g, int64_t n_tokens) {
    std::map<std::string, int> ops;
    int computed = 0;
    for (int i = 0; i < ggml_graph_n_nodes(g); ++i) {
        ggml_tensor * t = ggml_graph_node(g, i);
        const bool empty = t->op == GGML_OP_NONE || t->op == GGML_OP_VIEW || t->op == GGML_OP_RESHAPE ||
                           t->op == GGML_OP_PERMUTE || t->op == GGML_OP_TRANSPOSE;
        computed += !empty;
        ops[empty ? std::string("(view)") : std::string(ggml_op_desc(t))] += 1;
    }
    std::fprintf(stderr, "dsv4 graph: %d tokens, %d nodes (%d computed):", int(n_tokens), ggml_graph_n_nodes(g), computed);
    for (const auto & kv : ops) {
        std::fprintf(stderr, " %s=%d", kv.first.c_str(), kv.second);
    }
    std::fprintf(stderr, "\n");
}

size_t max_graph_nodes(const dsv4_hparams & hp) {
    return 4096 + size_t(hp.n_layer_all) * 1024;
}

// DSV4_PROFILE=1: time every node (through the scheduler's eval callback, which computes the
// graph node by node: slower, but the split between ops is what matters) and print, when the
// session ends, the totals per op and per block (the generated function that made the node,
// see Scope), prefill and decode apart. Each graph's first two runs are left out: they carry
// one-time costs (allocations, library handles, CUDA graph capture).

bool profile_callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * p = static_cast<OpProfile *>(user_data);
    const auto now = std::chrono::steady_clock::now();
    if (ask) {
        p->t0 = now;
        p->op = ggml_op_desc(t);
        const char * dot = std::strpbrk(t->name, ". ");
        p->block = dot != nullptr ? std::string(t->name, size_t(dot - t->name)) : std::string(t->name);
        if (p->block.empty()) {
            p->block = "(session)";
        }
        return true;
    }
    if (p->skip) {
        return true;
    }
    const double dt = std::chrono::duration<double>(now - p->t0).count();
    std::string shape = p->block + " " + p->op;
    for (int i = 0; i < 2 && t->src[i] != nullptr; ++i) {
        const ggml_tensor * a = t->src[i];
        shape += format(" %s[%lld,%lld,%lld]", ggml_type_name(a->type), (long long) a->ne[0], (long long) a->ne[1],
                        (long long) a->ne[2]);
    }
    for (auto * row : {&p->ops[p->phase][p->op], &p->blocks[p->phase][p->block + " " + p->op],
                       &p->shapes[p->phase][shape]}) {
        row->seconds += dt;
        row->nodes += 1;
    }
    return true;
}

void print_profile(const OpProfile & p) {
    for (const auto & [phase, ops] : p.ops) {
        double total = 0;
        for (const auto & kv : ops) {
            total += kv.second.seconds;
        }
        const int64_t steps = p.steps.count(phase) != 0 ? p.steps.at(phase) : 0;
        std::fprintf(stderr, "dsv4 profile, %s: %.3f s in nodes over %lld micro-batches (%.3f ms each)\n", phase.c_str(),
                     total, (long long) steps, 1e3 * total / double(std::max<int64_t>(steps, 1)));
        const auto print = [&](const char * what, const std::map<std::string, OpProfile::Row> & rows, size_t max_rows) {
            std::vector<std::pair<double, std::string>> order;
            for (const auto & kv : rows) {
                order.push_back({kv.second.seconds, kv.first});
            }
            std::sort(order.rbegin(), order.rend());
            std::fprintf(stderr, "  by %s:\n", what);
            for (size_t i = 0; i < order.size() && i < max_rows; ++i) {
                const auto & r = rows.at(order[i].second);
                std::fprintf(stderr, "    %-36s %8.3f s %5.1f%% %8lld nodes %9.1f us each\n", order[i].second.c_str(),
                             r.seconds, 100.0 * r.seconds / std::max(total, 1e-12), (long long) r.nodes,
                             1e6 * r.seconds / double(std::max<int64_t>(r.nodes, 1)));
            }
        };
        print("op", ops, 16);
        print("block and op", p.blocks.at(phase), 24);
        print("block, op and operands", p.shapes.at(phase), 16);
    }
}

// Builds and allocates the graph of s.plan: embedding, the trunk layers, the output head of the
// rows whose logits are wanted, then the cache writes and the deferred ring overwrites (after
// every read of the old rings).
std::unique_ptr<CachedGraph> build_graph(dsv4_session & s, const GraphKey & key) {
    const dsv4_model & m = *s.model;
    const dsv4_hparams & hp = m.hp;
    auto g = std::make_unique<CachedGraph>();
    g->key = key;
    const size_t max_nodes = max_graph_nodes(hp) + size_t(key.segment_lengths.size()) * hp.n_layer * 64;
    const size_t mem = ggml_tensor_overhead() * max_nodes + ggml_graph_overhead_custom(max_nodes, false);
    g->mem.resize(mem);
    g->ctx.reset(ggml_init({mem, g->mem.data(), true}));
    if (g->ctx == nullptr) {
        fail(DSV4_ERR_OUT_OF_MEMORY, "cannot create the graph context");
    }
    ggml_context * ctx = g->ctx.get();
    g->graph = ggml_new_graph_custom(ctx, max_nodes, false);
    g->step = std::make_unique<Step>(ctx, hp, s.layers, s.plan);
    Step & st = *g->step;
    // our flash-attention form (F32 keys, attention sinks) is a CPU path; CUDA uses the
    // matmul + softmax form, which ggml-cuda covers for every head size
    st.flash_attn = s.params.flash_attn && s.cpu == nullptr;
    st.cpu = s.cpu == nullptr;

    ggml_tensor * X = embed(st, m.weights);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        if (il + 1 == hp.n_layer) {
            // computed in every graph (the last layer's kv needs it), with or without logits
            g->health = ggml_sum(ctx, X);
            ggml_set_output(g->health);
            ggml_build_forward_expand(g->graph, g->health);
        }
        X = layer(st, m.weights.layers[il], il, X);
    }
    if (key.n_out > 0) {
        if (key.n_out < st.n_tokens) {  // only the rows whose logits are wanted, before the HC head (§3.9)
            g->out_rows = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, key.n_out);
            ggml_set_input(g->out_rows);
            ggml_tensor * flat = ggml_reshape_2d(ctx, X, X->ne[0] * X->ne[1], X->ne[2]);
            X = ggml_reshape_3d(ctx, ggml_get_rows(ctx, flat, g->out_rows), X->ne[0], X->ne[1], key.n_out);
        }
        g->logits = output_head(st, m.weights, X);
        ggml_set_output(g->logits);
        ggml_build_forward_expand(g->graph, g->logits);
    }
    // Graph order is expansion order. Every ring overwrite must come after every read of the old
    // ring: expand the cache writes, then the rows each overwrite writes (whose inputs reach all
    // earlier layers, and so all their ring reads), and only then the overwrites themselves.
    for (ggml_tensor * t : st.effects()) {
        ggml_build_forward_expand(g->graph, t);
    }
    for (ggml_tensor * t : st.deferred()) {
        ggml_build_forward_expand(g->graph, t->src[0]);
    }
    for (ggml_tensor * t : st.deferred()) {
        ggml_build_forward_expand(g->graph, t);
    }
    // the scheduler runs each op on the backend of its weights; the CPU comes last (CUDA
    // sessions: routed experts kept in host memory run there)
    ggml_backend_t backends[2] = {s.backend.get(), s.cpu.get()};
    const int n_backends = s.cpu != nullptr ? 2 : 1;
    g->sched.reset(ggml_backend_sched_new(backends, nullptr, n_backends, max_nodes, false, false));
    if (g->sched == nullptr) {
        fail(DSV4_ERR_BACKEND, "cannot create the backend scheduler");
    }
    if (s.profile != nullptr) {
        ggml_backend_sched_set_eval_callback(g->sched.get(), profile_callback, s.profile.get());
    }
    if (!ggml_backend_sched_alloc_graph(g->sched.get(), g->graph)) {
        fail(DSV4_ERR_OUT_OF_MEMORY, "cannot allocate the compute graph (%lld tokens)", (long long) s.plan.n_tokens);
    }
    s.n_graph_builds += 1;
    if (std::getenv("DSV4_GRAPH_STATS") != nullptr) {
        print_graph_stats(g->graph, s.plan.n_tokens);
    }
    return g;
}

// The cached graph for `key`, built (evicting the least recently used) when there is none.
CachedGraph & graph_for(dsv4_session & s, const GraphKey & key) {
    CachedGraph * found = nullptr;
    for (auto & g : s.graphs) {
        if (g->key == key) {
            found = g.get();
        }
    }
    if (found == nullptr) {
        if (s.graphs.size() >= kMaxCachedGraphs) {
            auto lru = std::min_element(s.graphs.begin(), s.graphs.end(),
                                        [](const auto & a, const auto & b) { return a->last_use < b->last_use; });
            s.graphs.erase(lru);
        }
        s.graphs.push_back(build_graph(s, key));
        found = s.graphs.back().get();
    }
    found->last_use = ++s.use_clock;
    return *found;
}

// --- the rings of a slot ----------------------------------------------------------------------------

enum RingKind { WINDOW = 0, RATIO4 = 4, RATIO128 = 128 };

struct RingRef {
    ggml_tensor * t;
    int64_t rows;  // per slot
    RingKind kind;
    bool score;    // a gate-logit plane (unwritten rows: -inf)
};

struct CacheRef {
    ggml_tensor * t;
    int64_t rows;  // per slot
    int ratio;
};

// ring rows per slot of each kind
int64_t ring_rows(const Geometry & geo, RingKind kind) {
    return kind == WINDOW ? geo.window_rows : kind == RATIO4 ? geo.ring4 : geo.ring128;
}

std::vector<RingRef> rings(const dsv4_session & s) {
    std::vector<RingRef> out;
    for (uint32_t il = 0; il < s.layers.size(); ++il) {
        const LayerState & L = s.layers[il];
        out.push_back({L.window, ring_rows(s.geo, WINDOW), WINDOW, false});
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

// Calls fn(first row, rows, first position) for the runs of consecutive ring rows that hold
// positions [p0, p1) of `slot` (at most two: the ring wraps once).
template <typename F> void ring_runs(int32_t slot, int64_t S, int64_t p0, int64_t p1, F && fn) {
    for (int64_t p = p0; p < p1;) {
        const int64_t r = p % S;
        const int64_t n = std::min(p1 - p, S - r);
        fn(slot * S + r, n, p);
        p += n;
    }
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

// --- micro-batches ----------------------------------------------------------------------------------

// Where a micro-batch's logits go: those of batch row `row`, to `dst`.
struct OutRow {
    int32_t row;
    float * dst;
};

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
    c.rings.resize(rings_get(s, slot, sl.n_past, s.geo.slack, nullptr));
    rings_get(s, slot, sl.n_past, s.geo.slack, c.rings.data());
    sl.checkpoints.push_back(std::move(c));
    if (int64_t(sl.checkpoints.size()) > s.params.n_checkpoints) {
        auto victim = std::find_if(sl.checkpoints.begin(), sl.checkpoints.end(), [](const Checkpoint & k) { return !k.prompt; });
        sl.checkpoints.erase(victim != sl.checkpoints.end() ? victim : sl.checkpoints.begin());
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
    CachedGraph & g = graph_for(s, graph_key(s.plan));
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
    if (ggml_backend_sched_graph_compute(g.sched.get(), g.graph) != GGML_STATUS_SUCCESS) {
        s.current = nullptr;
        s.graphs.clear();
        fail(DSV4_ERR_BACKEND, "the backend failed to compute the graph");
    }
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

// The persistent state of a session (§4.1), sized from n_ctx, the slots and the compress ratios:
// per layer a window ring; ratio 4: compressor rings (values and logits, 2·Dh wide) and n_ctx/4 + 1
// cache rows per slot, plus the same for the indexer (Di wide); ratio 128: rings and n_ctx/128 + 1
// cache rows per slot. The extra cache row takes the writes of dummy blocks; each compressor ring
// tensor ends with one synthetic row (value 0, logit -inf) that positions before 0 read.
// The compressor rings stay F32 (the reference keeps them in FP32, §4.1), and so do the raw
// windows, whose size does not grow with the context; the compressed caches, which do, take the
// session's cache type.
void for_each_state_tensor(const dsv4_hparams & hp, const Geometry & geo, ggml_type cache_type,
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
        for_each_state_tensor(hp, geo, ggml_type(params.cache_type),
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
    const size_t n_tensors = size_t(hp.n_layer) * 7 + 1;
    s->ctx_state.reset(ggml_init({ggml_tensor_overhead() * n_tensors, nullptr, true}));
    s->layers.resize(hp.n_layer);
    state_bytes(hp, params);  // checks that the sizes do not overflow
    for_each_state_tensor(hp, s->geo, ggml_type(params.cache_type),
                          [&](uint32_t il, const char * name, ggml_type type, int64_t ne0, int64_t ne1) {
        LayerState & L = s->layers[il];
        ggml_tensor * t = ggml_new_tensor_2d(s->ctx_state.get(), type, ne0, ne1);
        ggml_format_name(t, "%s.%u", name, unsigned(il));
        const std::string n = name;
        ggml_tensor ** slot = n == "window" ? &L.window
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
                    outs.push_back({int32_t(sg.offset + i), q.logits + (c.i0 + i) * int64_t(hp.n_vocab)});
                }
            } else if (q.out_rows == 1 && c.i0 + c.n == q.n_tokens) {
                outs.push_back({int32_t(sg.offset + c.n - 1), q.logits});
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
        if (c.pos >= n && c.pos - s.geo.slack <= n) {
            best = &c;
            break;
        }
    }
    for (size_t i = 0; best == nullptr && i < sl.checkpoints.size(); ++i) {
        const Checkpoint & c = sl.checkpoints[sl.checkpoints.size() - 1 - i];  // the latest at or before n
        best = c.pos <= n ? &c : nullptr;
    }
    s.n_restores += 1;
    if (best == nullptr) {
        clear_slot(s, seq);
    } else {
        const Checkpoint chosen = *best;
        cut(sl, std::max(n, chosen.pos));  // the checkpoints past both go
        rings_set(s, seq, chosen.pos, s.geo.slack, chosen.rings.data());
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
        const SeqRequest q{seq, tokens.data() + sl.n_past, n - sl.n_past, nullptr, 0};
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

// --- saved states -------------------------------------------------------------------------------
// One sequence, in a form that depends only on the sequence (not on the session's n_ctx, slots
// or ring slack, nor on how the sequence was computed: batched, rolled back or copied): header,
// the ring rows it needs to go on (ring by ring in layer order, positions ascending), the cache
// rows of its completed blocks, its tokens, then an FNV-1a checksum of everything before it.

namespace {

constexpr char kStateMagic[8] = {'D', 'S', 'V', '4', 'S', 'T', 'A', 'T'};
constexpr uint32_t kStateVersion = 2;

struct StateHeader {
    char magic[8];
    uint32_t version;
    int32_t cache_type;
    uint64_t model_fingerprint;
    int64_t n_past;
    uint64_t ring_bytes;
    uint64_t cache_bytes;
};

}  // namespace

size_t session_state_size(const dsv4_session & s, int32_t seq) {
    const SeqSlot & sl = session_slot(s, seq);
    return sizeof(StateHeader) + rings_get(s, seq, sl.n_past, 0, nullptr) + caches_io(s, seq, sl.n_past, nullptr, nullptr) +
           sl.tokens.size() * sizeof(int32_t) + sizeof(uint64_t);
}

size_t session_save_state(const dsv4_session & s, int32_t seq, uint8_t * dst, size_t capacity) {
    const size_t need = session_state_size(s, seq);
    if (capacity < need) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "the state needs %zu bytes, the buffer has %zu", need, capacity);
    }
    const SeqSlot & sl = s.slots[size_t(seq)];
    StateHeader h{};
    std::memcpy(h.magic, kStateMagic, sizeof(h.magic));
    h.version = kStateVersion;
    h.cache_type = s.params.cache_type;
    h.model_fingerprint = s.model->fingerprint;
    h.n_past = sl.n_past;
    uint8_t * p = dst + sizeof(h);
    h.ring_bytes = rings_get(s, seq, sl.n_past, 0, p);
    p += h.ring_bytes;
    h.cache_bytes = caches_io(s, seq, sl.n_past, p, nullptr);
    p += h.cache_bytes;
    std::memcpy(dst, &h, sizeof(h));
    std::memcpy(p, sl.tokens.data(), sl.tokens.size() * sizeof(int32_t));
    p += sl.tokens.size() * sizeof(int32_t);
    const uint64_t sum = fnv1a(dst, size_t(p - dst));
    std::memcpy(p, &sum, sizeof(sum));
    return need;
}

void session_load_state(dsv4_session & s, int32_t seq, const uint8_t * src, size_t size) {
    check_seq(s, seq, "load_state");
    StateHeader h{};
    if (size < sizeof(h) + sizeof(uint64_t)) {
        fail(DSV4_ERR_BAD_STATE, "the state blob is %zu bytes, too short to be a saved state", size);
    }
    std::memcpy(&h, src, sizeof(h));
    if (std::memcmp(h.magic, kStateMagic, sizeof(h.magic)) != 0) {
        fail(DSV4_ERR_BAD_STATE, "not a saved dsv4-ggml session state (bad magic)");
    }
    if (h.version != kStateVersion) {
        fail(DSV4_ERR_BAD_STATE, "saved state version %u is not supported (expected %u)", h.version, kStateVersion);
    }
    uint64_t sum;
    std::memcpy(&sum, src + size - sizeof(sum), sizeof(sum));
    if (sum != fnv1a(src, size - sizeof(sum))) {
        fail(DSV4_ERR_BAD_STATE, "the saved state is corrupt (checksum mismatch)");
    }
    if (h.model_fingerprint != s.model->fingerprint) {
        fail(DSV4_ERR_BAD_STATE, "the saved state belongs to another model");
    }
    if (h.cache_type != s.params.cache_type) {
        fail(DSV4_ERR_BAD_STATE, "the saved state is for cache type %s; this session has cache type %s",
             ggml_type_name(ggml_type(h.cache_type)), ggml_type_name(ggml_type(s.params.cache_type)));
    }
    if (h.n_past < 0 || h.n_past > s.params.n_ctx) {
        fail(DSV4_ERR_BAD_STATE, "the saved state holds %lld tokens; this session's n_ctx is %d", (long long) h.n_past,
             int(s.params.n_ctx));
    }
    if (h.ring_bytes != rings_get(s, seq, h.n_past, 0, nullptr) ||
        h.cache_bytes != caches_io(s, seq, h.n_past, nullptr, nullptr) ||
        size != sizeof(h) + h.ring_bytes + h.cache_bytes + uint64_t(h.n_past) * sizeof(int32_t) + sizeof(uint64_t)) {
        fail(DSV4_ERR_BAD_STATE, "the saved state's layout does not match this session");
    }
    const uint8_t * tok = src + sizeof(h) + h.ring_bytes + h.cache_bytes;
    std::vector<int32_t> toks(size_t(h.n_past));
    std::memcpy(toks.data(), tok, toks.size() * sizeof(int32_t));
    for (int32_t t : toks) {
        if (t < 0 || uint32_t(t) >= s.model->hp.n_vocab) {
            fail(DSV4_ERR_BAD_STATE, "the saved state holds token %d, outside the vocabulary", int(t));
        }
    }
    // validated: now change the slot
    clear_slot(s, seq);
    rings_set(s, seq, h.n_past, 0, src + sizeof(h));
    caches_io(s, seq, h.n_past, nullptr, src + sizeof(h) + h.ring_bytes);
    SeqSlot & sl = s.slots[size_t(seq)];
    sl.n_past = h.n_past;
    sl.tokens = std::move(toks);
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
    for (const auto & g : s.graphs) {
        st.compute_bytes_all += ggml_backend_sched_get_buffer_size(g->sched.get(), s.backend.get());
    }
    if (s.current != nullptr) {
        st.compute_bytes = ggml_backend_sched_get_buffer_size(s.current->sched.get(), s.backend.get());
        st.n_graph_splits = ggml_backend_sched_get_n_splits(s.current->sched.get());
        st.n_graph_copies = ggml_backend_sched_get_n_copies(s.current->sched.get());
    }
    return st;
}

}  // namespace dsv4

dsv4_session::~dsv4_session() {
    current = nullptr;
    graphs.clear();
    if (profile != nullptr) {
        dsv4::print_profile(*profile);
    }
}
