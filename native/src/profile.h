// Where a session's time goes: DSV4_PROFILE=1 times every node of every graph it computes (the
// scheduler's eval callback) and prints the totals when the session ends; DSV4_GRAPH_STATS=1
// prints the node counts of each graph it builds.
#pragma once

#include "ggml.h"

#include <chrono>
#include <cstdint>
#include <map>
#include <string>

namespace dsv4 {

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

// the scheduler's eval callback (user_data: an OpProfile)
bool profile_callback(ggml_tensor * t, bool ask, void * user_data);

// prefill and decode apart: time per op, per block and op, per block, op and operand shapes
void print_profile(const OpProfile & p);

// per-op node counts of a graph
void print_graph_stats(ggml_cgraph * g, int64_t n_tokens);

}  // namespace dsv4
