// A session: the state of up to n_seq sequences of one model (window rings, compressor states,
// compressed caches; one slot each), the backend that computes, and the graphs of recent
// micro-batches, reused between steps while their shape does not change.
//
// Every micro-batch may carry tokens of several sequences: the weights are read once for all of
// them, each sequence attends to its own state (step.h). A sequence can be rolled back
// (truncate) and copied into another slot (copy_seq); both leave it exactly as if it had been
// computed alone (tests/test_sequences.py).
#pragma once

#include "dsv4.h"
#include "model.h"
#include "step.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <array>
#include <memory>
#include <vector>

namespace dsv4 {

// A built and allocated graph, kept for the steps whose plan has the same key.
struct OpProfile;

struct CachedGraph {
    GraphKey key;
    std::unique_ptr<uint8_t[]> mem;        // not zero-filled: the context writes what it uses
    size_t max_nodes = 0;
    size_t compute_bytes = 0;              // what it needs of the session's compute buffer
    ggml_context_ptr ctx;                  // its tensors' metadata, in `mem`
    ggml_cgraph * graph = nullptr;
    ggml_tensor * logits = nullptr;
    ggml_tensor * mtp_logits = nullptr;    // the MTP block's (mtp sessions)
    ggml_tensor * out_rows = nullptr;      // i32: the batch rows whose logits are computed (null: all)
    ggml_tensor * health = nullptr;        // Σ of the last trunk layer's input: NaN/Inf check
    std::unique_ptr<Step> step;
    // what the session's scheduler changes in the graph when it allocates it, undone before it
    // allocates it again: its compute tensors' addresses, and the sources it redirects to copies
    // between backends
    std::vector<ggml_tensor *> compute_tensors;
    std::vector<std::array<ggml_tensor *, GGML_MAX_SRC>> node_srcs;
    uint64_t last_use = 0;
    int64_t n_runs = 0;                    // micro-batches computed with it
};

// The ring rows a sequence needs to go on from position `pos` (its window's last n_swa − 1 tokens,
// the compressors' previous and current blocks), copied out: what a checkpoint keeps.
struct Checkpoint {
    int64_t pos = 0;
    bool prompt = false;  // taken at the end of a multi-token request (kept longer than the others)
    std::vector<uint8_t> rings;
    // the first position whose rows it holds intact, per ring kind (window, ratio 4, ratio 128): the
    // rows it copied from before the slot's own ring_lo had been overwritten by tokens since rolled back
    int64_t lo[3] = {0, 0, 0};
};

// One sequence slot.
struct SeqSlot {
    int64_t n_past = 0;
    std::vector<int32_t> tokens;   // the sequence held (n_past tokens)
    // The rings hold this sequence's rows of every position from these on (up to n_past): older
    // rows were overwritten by later tokens (possibly tokens since rolled back).
    int64_t lo_window = 0, lo4 = 0, lo128 = 0;
    std::vector<Checkpoint> checkpoints;  // oldest first, positions ascending
};

// One sequence's part of an eval_batch call.
struct SeqRequest {
    int32_t seq;
    const int32_t * tokens;
    int64_t n_tokens;
    float * logits;     // out_rows × n_vocab
    int64_t out_rows;   // 0, 1 (the last token's) or n_tokens
    float * mtp_logits; // nullptr, or out_rows × n_vocab of the MTP block (an mtp session)
};

}  // namespace dsv4

struct dsv4_session {
    dsv4_model * model = nullptr;
    dsv4_session_params params{};
    // members are freed in reverse order: the graphs, the state, the scheduler (it uses the
    // backends), then the backends
    ggml_backend_ptr backend;  // the backend of the state and of most ops (CPU or CUDA)
    ggml_backend_ptr cpu;      // CUDA sessions: the CPU, for weights kept in host memory
    // one scheduler, and so one compute buffer, for every cached graph: a graph is (re)allocated
    // in it when it is used after another one (graphs.cpp)
    ggml_backend_sched_ptr sched;
    size_t sched_nodes = 0;

    // persistent state (§4.1), every slot's rows stacked in each tensor
    ggml_context_ptr ctx_state;
    ggml_backend_buffer_ptr buf_state;
    std::vector<dsv4::LayerState> layers;
    dsv4::Geometry geo;
    std::vector<dsv4::SeqSlot> slots;

    // the plan of the current micro-batch (every cached graph's Step reads its inputs from it)
    // and the graphs built so far, most recently used last
    dsv4::StepPlan plan;
    std::vector<std::unique_ptr<dsv4::CachedGraph>> graphs;
    dsv4::CachedGraph * current = nullptr;
    dsv4::CachedGraph * allocated = nullptr;  // the graph whose tensors the compute buffer holds
    uint64_t use_clock = 0;
    int64_t n_graph_builds = 0;
    int64_t n_ubatches = 0;
    int64_t n_restores = 0;     // truncations that restored a checkpoint (or re-evaluated from 0)
    int64_t n_reevaluated = 0;  // tokens those re-evaluated
    std::shared_ptr<dsv4::OpProfile> profile;  // DSV4_PROFILE=1

    ~dsv4_session();
};

namespace dsv4 {

std::unique_ptr<dsv4_session> create_session(dsv4_model * model, const dsv4_session_params & params);

// The cached graph for `key` (graphs.cpp), built (evicting the least recently used) when there is
// none, and allocated in the session's compute buffer.
CachedGraph & graph_for(dsv4_session & s, const GraphKey & key);

// Bytes of the persistent state of n_seq sequence slots of n_ctx tokens (what create_session
// allocates), and of one slot (*per_slot).
uint64_t state_bytes(const dsv4_hparams & hp, const dsv4_session_params & params, uint64_t * per_slot = nullptr);

// Runs every request's tokens (the sequences together, in micro-batches of at most
// params.n_ubatch tokens) and writes the logits each asks for.
void session_eval_batch(dsv4_session & s, const SeqRequest * requests, int64_t n_requests);

// One MTP draft row of sequence `seq` (see dsv4_session_mtp_draft): writes n_vocab logits.
void session_mtp_draft(dsv4_session & s, int32_t seq, int32_t token, int64_t offset, float * logits);

// Keeps the first n tokens of sequence `seq` (see dsv4_session_truncate).
void session_truncate(dsv4_session & s, int32_t seq, int64_t n);

// Makes slot dst a copy of slot src.
void session_copy_seq(dsv4_session & s, int32_t src, int32_t dst);

// Forgets sequence `seq` (every sequence when seq < 0).
void session_reset(dsv4_session & s, int32_t seq);

const SeqSlot & session_slot(const dsv4_session & s, int32_t seq);

dsv4_session_stats session_stats(const dsv4_session & s);

size_t session_state_size(const dsv4_session & s, int32_t seq);
size_t session_save_state(const dsv4_session & s, int32_t seq, uint8_t * dst, size_t capacity);
void session_load_state(dsv4_session & s, int32_t seq, const uint8_t * src, size_t size);

}  // namespace dsv4
