// The session's graph cache: a micro-batch's graph is built from its plan (the generated blocks
// over the runtime's Step) and kept for later micro-batches whose plan has the same key.
#include "session.h"

#include "blocks.h"
#include "error.h"
#include "profile.h"

#include <algorithm>
#include <cstdlib>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace dsv4 {

namespace {

constexpr size_t kMaxCachedGraphs = 6;

// The rows `rows` (i32; nullptr: all) of streams X ne{D, HC, T}.
ggml_tensor * out_rows(ggml_context * ctx, ggml_tensor * X, ggml_tensor * rows) {
    if (rows == nullptr) {
        return X;
    }
    ggml_tensor * flat = ggml_reshape_2d(ctx, X, X->ne[0] * X->ne[1], X->ne[2]);
    return ggml_reshape_3d(ctx, ggml_get_rows(ctx, flat, rows), X->ne[0], X->ne[1], rows->ne[0]);
}

// The MTP block's final norm: its own, else the trunk's (§3.10).
ggml_tensor * mtp_norm(const dsv4_model & m) {
    const LayerWeights & L = m.weights.layers[m.hp.n_layer];
    return L.nextn_shared_head_norm != nullptr ? L.nextn_shared_head_norm : m.weights.output_norm;
}

size_t max_graph_nodes(const dsv4_hparams & hp) {
    return 4096 + size_t(hp.n_layer_all) * 1024;
}

// Expands the step's cache writes and ring overwrites last (graph order is expansion order) and
// records the nodes' sources (the scheduler redirects some to its copies between backends).
void finish_graph(dsv4_session & s, CachedGraph & g, Step & st, size_t max_nodes) {
    // Graph order is expansion order. Every ring overwrite must come after every read of the old
    // ring: expand the cache writes, then the rows each overwrite writes (whose inputs reach all
    // earlier layers, and so all their ring reads), and only then the overwrites themselves.
    for (ggml_tensor * t : st.effects()) {
        ggml_build_forward_expand(g.graph, t);
    }
    for (ggml_tensor * t : st.deferred()) {
        ggml_build_forward_expand(g.graph, t->src[0]);
    }
    for (ggml_tensor * t : st.deferred()) {
        ggml_build_forward_expand(g.graph, t);
    }
    g.max_nodes = max_nodes;
    const int n_nodes = ggml_graph_n_nodes(g.graph);
    g.node_srcs.resize(size_t(n_nodes));
    for (int i = 0; i < n_nodes; ++i) {
        std::copy_n(ggml_graph_node(g.graph, i)->src, GGML_MAX_SRC, g.node_srcs[size_t(i)].begin());
    }
    s.n_graph_builds += 1;
    if (std::getenv("DSV4_GRAPH_STATS") != nullptr) {
        print_graph_stats(g.graph, s.plan.n_tokens);
    }
}

// Places graph g's tensors in the session's one compute buffer (which grows to the largest graph
// so far), unless they are there already. Every cached graph shares that buffer: memory does not
// grow with the number of cached graphs, and using another graph costs an allocation pass, not
// a rebuild.
void allocate(dsv4_session & s, CachedGraph & g) {
    if (s.allocated == &g) {
        return;
    }
    s.allocated = nullptr;
    if (s.sched == nullptr || s.sched_nodes < g.max_nodes) {
        // the scheduler runs each op on the backend of its weights; the CPU comes last (CUDA
        // sessions: routed experts kept in host memory run there)
        ggml_backend_t backends[2] = {s.backend.get(), s.cpu.get()};
        const int n_backends = s.cpu != nullptr ? 2 : 1;
        s.sched.reset();
        s.sched.reset(ggml_backend_sched_new(backends, nullptr, n_backends, g.max_nodes, false, false));
        if (s.sched == nullptr) {
            fail(DSV4_ERR_BACKEND, "cannot create the backend scheduler");
        }
        s.sched_nodes = g.max_nodes;
        if (s.profile != nullptr) {
            ggml_backend_sched_set_eval_callback(s.sched.get(), profile_callback, s.profile.get());
        }
    }
    // undo the previous allocation of g: a tensor with an address keeps it, and the scheduler
    // would read its sources' copies of the previous pass
    for (ggml_tensor * t : g.compute_tensors) {
        t->data = nullptr;
        t->buffer = nullptr;
    }
    for (size_t i = 0; i < g.node_srcs.size(); ++i) {
        std::copy(g.node_srcs[i].begin(), g.node_srcs[i].end(), ggml_graph_node(g.graph, int(i))->src);
    }
    ggml_backend_sched_reset(s.sched.get());
    if (!ggml_backend_sched_alloc_graph(s.sched.get(), g.graph)) {
        fail(DSV4_ERR_OUT_OF_MEMORY, "cannot allocate the compute graph (%lld tokens)", (long long) g.step->n_tokens);
    }
    if (g.compute_tensors.empty()) {
        // first allocation: which of its tensors the compute buffer holds, and how far into the
        // buffer(s) they reach (what g needs of it; the stats' compute_bytes)
        std::vector<std::pair<ggml_backend_buffer_t, size_t>> reach;
        for (ggml_tensor * t = ggml_get_first_tensor(g.ctx.get()); t != nullptr; t = ggml_get_next_tensor(g.ctx.get(), t)) {
            if (t->buffer == nullptr || ggml_backend_buffer_get_usage(t->buffer) != GGML_BACKEND_BUFFER_USAGE_COMPUTE) {
                continue;
            }
            g.compute_tensors.push_back(t);
            if (t->view_src != nullptr || ggml_backend_buffer_get_type(t->buffer) != ggml_backend_get_default_buffer_type(s.backend.get())) {
                continue;
            }
            const size_t end = size_t((const char *) t->data - (const char *) ggml_backend_buffer_get_base(t->buffer)) +
                               ggml_backend_buffer_get_alloc_size(t->buffer, t);
            auto it = std::find_if(reach.begin(), reach.end(), [&](const auto & r) { return r.first == t->buffer; });
            if (it == reach.end()) {
                reach.emplace_back(t->buffer, end);
            } else {
                it->second = std::max(it->second, end);
            }
        }
        g.compute_bytes = 0;
        for (const auto & r : reach) {
            g.compute_bytes += r.second;
        }
    }
    s.allocated = &g;
}

// Builds the graph of s.plan: embedding, the trunk layers, the output head of the
// rows whose logits are wanted, then the cache writes and the deferred ring overwrites (after
// every read of the old rings).
std::unique_ptr<CachedGraph> build_graph(dsv4_session & s, const GraphKey & key) {
    const dsv4_model & m = *s.model;
    const dsv4_hparams & hp = m.hp;
    auto g = std::make_unique<CachedGraph>();
    g->key = key;
    const size_t max_nodes = max_graph_nodes(hp) + size_t(key.segment_lengths.size()) * hp.n_layer_all * 64;
    const size_t mem = ggml_tensor_overhead() * max_nodes + ggml_graph_overhead_custom(max_nodes, false);
    g->mem.reset(new uint8_t[mem]);
    g->ctx.reset(ggml_init({mem, g->mem.get(), true}));
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

    if (key.mtp_only) {  // an MTP draft step: the MTP block alone over one-token segments
        const uint32_t il = hp.n_layer;
        const LayerWeights & L = m.weights.layers[il];
        ggml_tensor * Xm = layer(st, L, il, mtp_input(st, L, il, st.mtp_prev(il, nullptr), token_rows(st, m.weights)));
        st.keep_final(il, Xm);   // the next draft row's state: the block's own output (§3.10)
        g->logits = head(st, m.weights, Xm, mtp_norm(m));
        ggml_set_output(g->logits);
        ggml_build_forward_expand(g->graph, g->logits);
        finish_graph(s, *g, st, max_nodes);
        return g;
    }
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
    // the MTP block (§3.10) over every token: its rows are (the trunk's final streams at the
    // previous position, the token), at the token's position, through its own window layer
    ggml_tensor * Xm = nullptr;
    if (s.params.mtp) {
        const uint32_t il = hp.n_layer;
        const LayerWeights & L = m.weights.layers[il];
        Xm = layer(st, L, il, mtp_input(st, L, il, st.mtp_prev(il, X), token_rows(st, m.weights)));
        st.keep_final(il, X);
    }
    if (key.n_out > 0) {
        if (key.n_out < st.n_tokens) {  // only the rows whose logits are wanted, before the HC head (§3.9)
            g->out_rows = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, key.n_out);
            ggml_set_input(g->out_rows);
        }
        g->logits = output_head(st, m.weights, out_rows(ctx, X, g->out_rows));
        ggml_set_output(g->logits);
        ggml_build_forward_expand(g->graph, g->logits);
        if (Xm != nullptr && key.mtp_out) {  // the MTP head only when its logits are asked for
            g->mtp_logits = head(st, m.weights, out_rows(ctx, Xm, g->out_rows), mtp_norm(m));
            ggml_set_output(g->mtp_logits);
            ggml_build_forward_expand(g->graph, g->mtp_logits);
        }
    }
    finish_graph(s, *g, st, max_nodes);
    return g;
}

// Drops the session's pointers to g (about to be freed).
void forget(dsv4_session & s, const CachedGraph * g) {
    if (s.allocated == g) {
        s.allocated = nullptr;
    }
    if (s.current == g) {
        s.current = nullptr;
    }
}

}  // namespace

// The cached graph for `key`, built (evicting the least recently used) when there is none, and
// allocated.

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
            forget(s, lru->get());
            s.graphs.erase(lru);
#if defined(__GLIBC__)
            // give the evicted graph's metadata back to the system: glibc keeps freed blocks of
            // this size in its heap, and a server that rebuilds graphs for ever-new batch shapes
            // would hold a band of tens of MiB it no longer uses
            malloc_trim(0);
#endif
        }
        s.graphs.push_back(build_graph(s, key));
        found = s.graphs.back().get();
    }
    try {
        allocate(s, *found);
    } catch (...) {
        // a graph that could not be placed (out of memory) may hold half-assigned addresses: it
        // goes, and the next step builds it again
        forget(s, found);
        s.graphs.erase(std::find_if(s.graphs.begin(), s.graphs.end(), [&](const auto & g) { return g.get() == found; }));
        throw;
    }
    found->last_use = ++s.use_clock;
    return *found;
}

}  // namespace dsv4
