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

constexpr size_t kMaxCachedGraphs = 4;

struct OpProfile {
    struct Row {
        double seconds = 0;
        int64_t nodes = 0;
    };
    const char * phase = "prefill";                  // "decode": one-token micro-batches
    std::map<std::string, int64_t> steps;           // micro-batches per phase
    std::map<std::string, std::map<std::string, Row>> ops, blocks;  // phase → op / block·op
    std::chrono::steady_clock::time_point t0;
    std::string op, block;
};


namespace {

int default_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : int(n);
}

void fill_f32(ggml_tensor * t, float value) {
    std::vector<float> v(size_t(ggml_nelements(t)), value);
    ggml_backend_tensor_set(t, v.data(), 0, v.size() * sizeof(float));
}

// Zeroes every state tensor and sets the compressor logit planes to -inf: ring rows that no
// token has written yet must get weight exactly 0 in the pooling (§4.2, §7 #29).
void clear_state(dsv4_session & s) {
    ggml_backend_buffer_clear(s.buf_state.get(), 0);
    for (LayerState & L : s.layers) {
        for (CompressorState * cs : {&L.main, &L.index}) {
            if (cs->score != nullptr) {
                fill_f32(cs->score, -INFINITY);
            }
        }
    }
    s.n_past = 0;
    s.tokens.clear();
}

ggml_tensor * new_state(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1, const char * name, uint32_t il) {
    ggml_tensor * t = ggml_new_tensor_2d(ctx, type, ne0, ne1);
    ggml_format_name(t, "%s.%u", name, unsigned(il));
    return t;
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
// see Scope), prefill and decode apart.

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
    const double dt = std::chrono::duration<double>(now - p->t0).count();
    for (auto * row : {&p->ops[p->phase][p->op], &p->blocks[p->phase][p->block + " " + p->op]}) {
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
                std::fprintf(stderr, "    %-36s %8.3f s %5.1f%% %8lld nodes\n", order[i].second.c_str(), r.seconds,
                             100.0 * r.seconds / std::max(total, 1e-12), (long long) r.nodes);
            }
        };
        print("op", ops, 16);
        print("block and op", p.blocks.at(phase), 24);
    }
}

// Builds and allocates the graph of s.plan: embedding, the trunk layers, the output head, then
// the cache writes and the deferred ring overwrites (after every read of the old rings).
std::unique_ptr<CachedGraph> build_graph(dsv4_session & s, const GraphKey & key) {
    const dsv4_model & m = *s.model;
    const dsv4_hparams & hp = m.hp;
    auto g = std::make_unique<CachedGraph>();
    g->key = key;
    const size_t max_nodes = max_graph_nodes(hp);
    const size_t mem = ggml_tensor_overhead() * max_nodes + ggml_graph_overhead_custom(max_nodes, false);
    g->mem.resize(mem);
    g->ctx.reset(ggml_init({mem, g->mem.data(), true}));
    if (g->ctx == nullptr) {
        fail(DSV4_ERR_OUT_OF_MEMORY, "cannot create the graph context");
    }
    g->graph = ggml_new_graph_custom(g->ctx.get(), max_nodes, false);
    g->step = std::make_unique<Step>(g->ctx.get(), hp, s.layers, s.plan);
    Step & st = *g->step;
    // our flash-attention form (F32 keys, attention sinks) is a CPU path; CUDA uses the
    // matmul + softmax form, which ggml-cuda covers for every head size
    st.flash_attn = s.params.flash_attn && s.cpu == nullptr;
    st.cpu = s.cpu == nullptr;

    ggml_tensor * X = embed(st, m.weights);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        if (il + 1 == hp.n_layer) {
            // computed in every graph (the last layer's kv needs it), with or without logits
            g->health = ggml_sum(g->ctx.get(), X);
            ggml_set_output(g->health);
            ggml_build_forward_expand(g->graph, g->health);
        }
        X = layer(st, m.weights.layers[il], il, X);
    }
    if (key.out != OutMode::NONE) {
        if (key.out == OutMode::LAST) {  // only the last token's logits: select it before the HC head (§3.9)
            X = ggml_cont(g->ctx.get(), ggml_view_3d(g->ctx.get(), X, X->ne[0], X->ne[1], 1, X->nb[1], X->nb[2],
                                               size_t(st.n_tokens - 1) * X->nb[2]));
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

void run_ubatch(dsv4_session & s, const int32_t * tokens, int64_t T, OutMode out, float * logits) {
    const dsv4_hparams & hp = s.model->hp;
    s.plan = make_plan(hp, s.n_past, tokens, T, s.n_rows4, s.n_rows128, s.has4, s.has128);
    CachedGraph & g = graph_for(s, graph_key(s.plan, out));
    s.current = &g;
    g.step->set_inputs();
    if (s.profile != nullptr) {
        s.profile->phase = T == 1 ? "decode" : "prefill";
        s.profile->steps[s.profile->phase] += 1;
    }
    if (ggml_backend_sched_graph_compute(g.sched.get(), g.graph) != GGML_STATUS_SUCCESS) {
        s.current = nullptr;
        s.graphs.clear();
        fail(DSV4_ERR_BACKEND, "the backend failed to compute the graph");
    }
    s.n_past += T;
    s.tokens.insert(s.tokens.end(), tokens, tokens + T);
    s.n_ubatches += 1;
    float health = 0.0f;
    ggml_backend_tensor_get(g.health, &health, 0, sizeof(health));
    bool finite = std::isfinite(health);
    if (out != OutMode::NONE) {
        ggml_backend_tensor_get(g.logits, logits, 0, ggml_nbytes(g.logits));
        const int64_t n = ggml_nelements(g.logits);
        for (int64_t i = 0; i < n && finite; ++i) {
            finite = std::isfinite(logits[i]);
        }
    }
    if (!finite) {
        fail(DSV4_ERR_NUMERICS,
             "non-finite values (NaN/Inf) appeared while computing positions %lld..%lld; the session state may hold "
             "them now: reset it", (long long) (s.n_past - T), (long long) (s.n_past - 1));
    }
}

}  // namespace

// The persistent state of a session (§4.1), sized from n_ctx and the compress ratios: per
// layer a window ring; ratio 4: compressor rings of 8 rows (values and logits, 2·Dh wide) and
// n_ctx/4 + 1 cache rows, plus the same for the indexer (Di wide); ratio 128: rings of 128 rows
// and n_ctx/128 + 1 cache rows. The extra cache row takes the writes of dummy blocks.
// The compressor rings stay F32 (the reference keeps them in FP32, §4.1), and so does the raw
// window, whose size does not grow with the context; the compressed caches, which do, take the
// session's cache type.
void for_each_state_tensor(const dsv4_hparams & hp, int64_t n_ctx, ggml_type cache_type,
                           const std::function<void(uint32_t il, const char * name, ggml_type type, int64_t ne0,
                                                    int64_t ne1)> & fn) {
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const int ratio = hp.compress_ratios[il];
        fn(il, "window", GGML_TYPE_F32, hp.head_dim, hp.n_swa);  // fixed size: always F32
        if (ratio != 0) {
            const int64_t c = ratio == 4 ? 2 : 1;
            const int64_t rows = ratio == 4 ? 8 : 128;
            fn(il, "comp_kv", GGML_TYPE_F32, c * hp.head_dim, rows);
            fn(il, "comp_score", GGML_TYPE_F32, c * hp.head_dim, rows);
            fn(il, "comp_cache", cache_type, hp.head_dim, n_ctx / ratio + 1);
        }
        if (ratio == 4) {
            fn(il, "index_kv", GGML_TYPE_F32, 2 * int64_t(hp.indexer_head_dim), 8);
            fn(il, "index_score", GGML_TYPE_F32, 2 * int64_t(hp.indexer_head_dim), 8);
            fn(il, "index_cache", cache_type, hp.indexer_head_dim, n_ctx / 4 + 1);
        }
    }
}

void check_cache_type(const dsv4_hparams & hp, int32_t type) {
    if (type != GGML_TYPE_F32 && type != GGML_TYPE_F16 && type != GGML_TYPE_BF16 && type != GGML_TYPE_Q8_0) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "cache type %d is not supported (f32, f16, bf16, q8_0)", int(type));
    }
    const int64_t blck = ggml_blck_size(ggml_type(type));
    if (hp.head_dim % blck != 0 || hp.indexer_head_dim % blck != 0) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "cache type %s needs head dims that are multiples of %lld",
             ggml_type_name(ggml_type(type)), (long long) blck);
    }
}

uint64_t state_bytes(const dsv4_hparams & hp, int64_t n_ctx, int32_t cache_type) {
    check_cache_type(hp, cache_type);
    // the sizes come from the file's hyperparameters (head dims, sliding window): with hostile
    // values they overflow 64 bits, and ggml would size a tensor by the wrapped-around product
    uint64_t total = 0;
    bool overflow = false;
    for_each_state_tensor(hp, n_ctx, ggml_type(cache_type),
                          [&](uint32_t, const char *, ggml_type type, int64_t ne0, int64_t ne1) {
        uint64_t bytes = 0;
        overflow = overflow || __builtin_mul_overflow(uint64_t(ggml_row_size(type, ne0)), uint64_t(ne1), &bytes) ||
                   bytes > (uint64_t(1) << 62) || __builtin_add_overflow(total, GGML_PAD(bytes, 32), &total);
    });
    if (overflow || total > (uint64_t(1) << 62)) {
        fail(DSV4_ERR_OUT_OF_MEMORY,
             "the session state for n_ctx %lld would need more than 2^62 bytes (attention.key_length %u, "
             "attention.sliding_window %u)", (long long) n_ctx, unsigned(hp.head_dim), unsigned(hp.n_swa));
    }
    return total;
}

std::unique_ptr<dsv4_session> create_session(dsv4_model * model, const dsv4_session_params & params) {
    const dsv4_hparams & hp = model->hp;
    if (params.n_ctx < 1) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "n_ctx must be at least 1, got %d", int(params.n_ctx));
    }
    if (uint32_t(params.n_ctx) > hp.n_ctx_train) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "n_ctx %d exceeds the model's context length %u (deepseek4.context_length)",
             int(params.n_ctx), unsigned(hp.n_ctx_train));
    }
    if (params.n_ubatch < 1) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "n_ubatch must be at least 1, got %d", int(params.n_ubatch));
    }
    auto s = std::make_unique<dsv4_session>();
    s->model = model;
    s->params = params;
    s->params.n_ubatch = std::min(params.n_ubatch, params.n_ctx);
    s->params.n_threads = params.n_threads > 0 ? params.n_threads : (model->params.n_threads > 0
                                                                        ? model->params.n_threads : default_threads());

    s->backend.reset(make_backend(model->params.backend, s->params.n_threads));
    if (model->params.backend != DSV4_BACKEND_CPU) {
        s->cpu.reset(make_backend(DSV4_BACKEND_CPU, s->params.n_threads));
    }

    // state tensors, sized from n_ctx and the compress ratios (§4.1)
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        s->has4 = s->has4 || hp.compress_ratios[il] == 4;
        s->has128 = s->has128 || hp.compress_ratios[il] == 128;
    }
    s->n_rows4 = params.n_ctx / 4 + 1;
    s->n_rows128 = params.n_ctx / 128 + 1;
    const size_t n_tensors = size_t(hp.n_layer) * 7 + 1;
    s->ctx_state.reset(ggml_init({ggml_tensor_overhead() * n_tensors, nullptr, true}));
    s->layers.resize(hp.n_layer);
    state_bytes(hp, params.n_ctx, params.cache_type);  // checks the cache type, and that the sizes do not overflow
    for_each_state_tensor(hp, params.n_ctx, ggml_type(params.cache_type),
                          [&](uint32_t il, const char * name, ggml_type type, int64_t ne0, int64_t ne1) {
        LayerState & L = s->layers[il];
        ggml_tensor * t = new_state(s->ctx_state.get(), type, ne0, ne1, name, il);
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
        fail(DSV4_ERR_OUT_OF_MEMORY, "cannot allocate the session state for n_ctx %d", int(params.n_ctx));
    }
    clear_state(*s);
    if (std::getenv("DSV4_PROFILE") != nullptr) {
        s->profile = std::make_shared<OpProfile>();
    }

    return s;
}

void session_eval(dsv4_session & s, const int32_t * tokens, int64_t n, float * logits, int64_t out_rows) {
    const dsv4_hparams & hp = s.model->hp;
    if (n < 1) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "eval needs at least one token");
    }
    for (int64_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || uint32_t(tokens[i]) >= hp.n_vocab) {
            fail(DSV4_ERR_INVALID_ARGUMENT, "token %lld at index %lld is outside the vocabulary [0, %u)",
                 (long long) tokens[i], (long long) i, unsigned(hp.n_vocab));
        }
    }
    if (s.n_past + n > s.params.n_ctx) {
        fail(DSV4_ERR_CONTEXT_OVERFLOW, "%lld tokens do not fit: %lld of n_ctx %d are used",
             (long long) n, (long long) s.n_past, int(s.params.n_ctx));
    }
    if (out_rows != 0 && out_rows != 1 && out_rows != n) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "out_rows must be 0, 1 or the token count");
    }
    const int64_t nb = s.params.n_ubatch;
    for (int64_t i0 = 0; i0 < n; i0 += nb) {
        const int64_t T = std::min(nb, n - i0);
        const bool final_batch = i0 + T == n;
        if (out_rows == n) {
            run_ubatch(s, tokens + i0, T, OutMode::ALL, logits + i0 * int64_t(hp.n_vocab));
        } else if (out_rows == 1 && final_batch) {
            run_ubatch(s, tokens + i0, T, OutMode::LAST, logits);
        } else {  // nobody reads these logits: the graph has no output head at all
            run_ubatch(s, tokens + i0, T, OutMode::NONE, nullptr);
        }
    }
}

void session_reset(dsv4_session & s) {
    clear_state(s);
}

// --- saved states -------------------------------------------------------------------------------
// Layout: header, then every state tensor's bytes in creation order, then the tokens, then an
// FNV-1a checksum of everything before it.

namespace {

constexpr char kStateMagic[8] = {'D', 'S', 'V', '4', 'S', 'T', 'A', 'T'};
constexpr uint32_t kStateVersion = 1;

struct StateHeader {
    char magic[8];
    uint32_t version;
    int32_t n_ctx;
    uint64_t model_fingerprint;
    int32_t cache_type;
    int32_t n_tensors;
    int64_t n_past;
    uint64_t state_bytes;
};

std::vector<ggml_tensor *> state_tensors(const dsv4_session & s) {
    std::vector<ggml_tensor *> out;
    for (ggml_tensor * t = ggml_get_first_tensor(s.ctx_state.get()); t != nullptr; t = ggml_get_next_tensor(s.ctx_state.get(), t)) {
        out.push_back(t);
    }
    return out;
}

uint64_t tensor_bytes(const std::vector<ggml_tensor *> & ts) {
    uint64_t n = 0;
    for (ggml_tensor * t : ts) {
        n += ggml_nbytes(t);
    }
    return n;
}

}  // namespace

size_t session_state_size(const dsv4_session & s) {
    return sizeof(StateHeader) + tensor_bytes(state_tensors(s)) + s.tokens.size() * sizeof(int32_t) + sizeof(uint64_t);
}

size_t session_save_state(const dsv4_session & s, uint8_t * dst, size_t capacity) {
    const size_t need = session_state_size(s);
    if (capacity < need) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "the state needs %zu bytes, the buffer has %zu", need, capacity);
    }
    const auto tensors = state_tensors(s);
    StateHeader h{};
    std::memcpy(h.magic, kStateMagic, sizeof(h.magic));
    h.version = kStateVersion;
    h.n_ctx = s.params.n_ctx;
    h.model_fingerprint = s.model->fingerprint;
    h.cache_type = s.params.cache_type;
    h.n_tensors = int32_t(tensors.size());
    h.n_past = s.n_past;
    h.state_bytes = tensor_bytes(tensors);
    uint8_t * p = dst;
    std::memcpy(p, &h, sizeof(h));
    p += sizeof(h);
    for (ggml_tensor * t : tensors) {
        ggml_backend_tensor_get(t, p, 0, ggml_nbytes(t));
        p += ggml_nbytes(t);
    }
    std::memcpy(p, s.tokens.data(), s.tokens.size() * sizeof(int32_t));
    p += s.tokens.size() * sizeof(int32_t);
    const uint64_t sum = fnv1a(dst, size_t(p - dst));
    std::memcpy(p, &sum, sizeof(sum));
    return need;
}

void session_load_state(dsv4_session & s, const uint8_t * src, size_t size) {
    const auto tensors = state_tensors(s);
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
    if (h.n_ctx != s.params.n_ctx || h.cache_type != s.params.cache_type) {
        fail(DSV4_ERR_BAD_STATE, "the saved state is for n_ctx %d / cache type %s; this session has n_ctx %d / %s",
             int(h.n_ctx), ggml_type_name(ggml_type(h.cache_type)), int(s.params.n_ctx),
             ggml_type_name(ggml_type(s.params.cache_type)));
    }
    if (h.n_tensors != int32_t(tensors.size()) || h.state_bytes != tensor_bytes(tensors) || h.n_past < 0 ||
        h.n_past > s.params.n_ctx ||
        size != sizeof(h) + h.state_bytes + uint64_t(h.n_past) * sizeof(int32_t) + sizeof(uint64_t)) {
        fail(DSV4_ERR_BAD_STATE, "the saved state's layout does not match this session");
    }
    const uint8_t * tok = src + sizeof(h) + h.state_bytes;
    std::vector<int32_t> toks(size_t(h.n_past));
    std::memcpy(toks.data(), tok, toks.size() * sizeof(int32_t));
    for (int32_t t : toks) {
        if (t < 0 || uint32_t(t) >= s.model->hp.n_vocab) {
            fail(DSV4_ERR_BAD_STATE, "the saved state holds token %d, outside the vocabulary", int(t));
        }
    }
    // validated: now change the session
    const uint8_t * p = src + sizeof(h);
    for (ggml_tensor * t : tensors) {
        ggml_backend_tensor_set(t, p, 0, ggml_nbytes(t));
        p += ggml_nbytes(t);
    }
    s.n_past = h.n_past;
    s.tokens = std::move(toks);
}

dsv4_session_stats session_stats(const dsv4_session & s) {
    dsv4_session_stats st{};
    st.n_past = s.n_past;
    st.n_ubatches = s.n_ubatches;
    st.n_graph_builds = s.n_graph_builds;
    st.n_graph_nodes = s.current != nullptr ? ggml_graph_n_nodes(s.current->graph) : 0;
    st.state_bytes = ggml_backend_buffer_get_size(s.buf_state.get());
    for (const auto & g : s.graphs) {
        st.compute_bytes_all += ggml_backend_sched_get_buffer_size(g->sched.get(), s.backend.get());
    }
    if (s.current != nullptr) {
        st.compute_bytes = ggml_backend_sched_get_buffer_size(s.current->sched.get(), s.backend.get());
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
