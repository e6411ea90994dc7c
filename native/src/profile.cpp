#include "profile.h"

#include "error.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <utility>
#include <vector>

namespace dsv4 {

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

}  // namespace dsv4
