// A decoding session: the per-sequence state of one model (window rings, compressor states,
// compressed caches), the backend that computes, and the graph of the current micro-batch,
// reused between decode steps while its shape does not change.
#pragma once

#include "dsv4.h"
#include "model.h"
#include "step.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <memory>
#include <vector>

namespace dsv4 {

// A built and allocated graph, kept for the steps whose plan has the same key.
struct OpProfile;

struct CachedGraph {
    GraphKey key;
    std::vector<uint8_t> mem;
    ggml_context_ptr ctx;                  // its tensors' metadata, in `mem`
    ggml_cgraph * graph = nullptr;
    ggml_tensor * logits = nullptr;
    ggml_tensor * health = nullptr;        // Σ of the last trunk layer's input: NaN/Inf check
    std::unique_ptr<Step> step;
    ggml_backend_sched_ptr sched;          // each graph keeps its own compute buffer
    uint64_t last_use = 0;
};

}  // namespace dsv4

struct dsv4_session {
    dsv4_model * model = nullptr;
    dsv4_session_params params{};
    // members are freed in reverse order: the graphs (their schedulers use the backends), then
    // the state, then the backends
    ggml_backend_ptr backend;  // the backend of the state and of most ops (CPU or CUDA)
    ggml_backend_ptr cpu;      // CUDA sessions: the CPU, for weights kept in host memory

    // persistent state (§4.1)
    ggml_context_ptr ctx_state;
    ggml_backend_buffer_ptr buf_state;
    std::vector<dsv4::LayerState> layers;
    int64_t n_rows4 = 0;    // rows of each ratio-4 cache (blocks of n_ctx, plus one dummy row)
    int64_t n_rows128 = 0;
    bool has4 = false, has128 = false;
    int64_t n_past = 0;
    std::vector<int32_t> tokens;  // the sequence held (n_past tokens)

    // the plan of the current micro-batch (every cached graph's Step reads its inputs from it)
    // and the graphs built so far, most recently used last
    dsv4::StepPlan plan;
    std::vector<std::unique_ptr<dsv4::CachedGraph>> graphs;
    dsv4::CachedGraph * current = nullptr;
    uint64_t use_clock = 0;
    int64_t n_graph_builds = 0;
    int64_t n_ubatches = 0;
    std::shared_ptr<dsv4::OpProfile> profile;  // DSV4_PROFILE=1

    ~dsv4_session();
};

namespace dsv4 {

std::unique_ptr<dsv4_session> create_session(dsv4_model * model, const dsv4_session_params & params);

// Bytes of a session's persistent state for n_ctx tokens (what create_session allocates).
uint64_t state_bytes(const dsv4_hparams & hp, int64_t n_ctx, int32_t cache_type);

// Runs `n` tokens (in micro-batches of params.n_ubatch) and writes logits: all rows
// (out_rows == n) or only the last (out_rows == 1) or none (out_rows == 0).
void session_eval(dsv4_session & s, const int32_t * tokens, int64_t n, float * logits, int64_t out_rows);

void session_reset(dsv4_session & s);

dsv4_session_stats session_stats(const dsv4_session & s);

size_t session_state_size(const dsv4_session & s);
size_t session_save_state(const dsv4_session & s, uint8_t * dst, size_t capacity);
void session_load_state(dsv4_session & s, const uint8_t * src, size_t size);

}  // namespace dsv4
