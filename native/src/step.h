// The runtime side of one micro-batch graph: what the generated blocks (native/generated/
// blocks.cpp) call for everything that touches session state — the sliding window, the
// compressor states, the compressed caches and the per-step compression plan (spec §4).
//
// A Step is built on the host for a batch of T consecutive tokens at positions b0 … b0+T−1.
// Every data-dependent choice inside the step (indexer top-k, expert selection) stays in the
// graph; the host only supplies what follows from positions (masks, row indices).
#pragma once

#include "dsv4.h"
#include "ggml.h"

#include <cstdint>
#include <vector>

namespace dsv4 {

// Rope parameters of one layer (§1.3, §3.4.3): plain base on ratio-0 layers, compress base +
// YaRN (without magnitude scaling) on compressed layers.
struct RopeParams {
    int n_dims;
    int n_ctx_orig;
    float freq_base;
    float freq_scale;
    float ext_factor;
    float attn_factor;
    float beta_fast;
    float beta_slow;
};

RopeParams layer_rope(const dsv4_hparams & hp, uint32_t il);

// Rotates the last n_dims of every head (interleaved pairs, ggml mode 0) / rotates them back.
ggml_tensor * rope_tail(ggml_context * ctx, ggml_tensor * x, ggml_tensor * pos, const RopeParams & rp);
ggml_tensor * rope_tail_inverse(ggml_context * ctx, ggml_tensor * x, ggml_tensor * pos, const RopeParams & rp);

// Σ_k weights[k, t]·outs[:, k, t]: ne{D, K, T}, ne{K, T} -> ne{D, T}.
ggml_tensor * mix_experts(ggml_context * ctx, ggml_tensor * outs, ggml_tensor * weights);

// The three compressor streams of a layer (§3.5): the CSA and HCA main compressors and the
// lightning indexer's key compressor (ratio 4, like CSA).
enum class Stream { CSA = 0, HCA = 1, INDEXER = 2 };

// Keys one attention query sees (§3.4.4), as two parts: keys shared by the whole batch
// (window and HCA entries) and keys picked per query (CSA selection). K = V.
struct KeySet {
    ggml_tensor * shared = nullptr;       // ne{Dh, N}
    ggml_tensor * shared_mask = nullptr;  // ne{N, T} f32: 0 visible, -inf hidden
    ggml_tensor * own = nullptr;          // ne{Dh, k, T}
    ggml_tensor * own_mask = nullptr;     // ne{k, T} f32
    // the same keys where they are stored, for the fused attention of a decode step (ops.h:
    // attend_decode reads them in place): the window ring, this token's key, their mask
    // (ne{W + 1, 1}), and the layer's compressed entries with their mask, all of them or the
    // picked rows `cache_idx` (I32 ne{k})
    ggml_tensor * ring = nullptr;
    ggml_tensor * fresh = nullptr;
    ggml_tensor * ring_mask = nullptr;
    ggml_tensor * cache = nullptr;
    ggml_tensor * cache_mask = nullptr;
    ggml_tensor * cache_idx = nullptr;
};

// The rows a compressor pools in one micro-batch: the ring of earlier tokens and this batch's
// rows (values and gate logits), and each block's members as rows of concat(ring, batch)
// (native/ops/ops.h: compress_pool gathers them itself, nothing is concatenated).
struct CompressorRows {
    ggml_tensor * ring_kv;     // ne{c·d, ring rows}
    ggml_tensor * kv;          // ne{c·d, T}
    ggml_tensor * ring_score;  // ne{c·d, ring rows}
    ggml_tensor * score;       // ne{c·d, T}
    ggml_tensor * members;     // i32 ne{members·n_blocks}
    int64_t n_blocks;
};

// Persistent per-layer state in the session's cache buffer (§4.1).
struct CompressorState {
    ggml_tensor * kv = nullptr;     // ne{c·d, ring rows}: values of the last tokens, row pos mod rows
    ggml_tensor * score = nullptr;  // ne{c·d, ring rows}: their gate logits (APE included)
    ggml_tensor * cache = nullptr;  // ne{d, n_rows}: compressed entries, row j = block j; last row: dummy
};

struct LayerState {
    ggml_tensor * window = nullptr;  // ne{Dh, n_swa}: raw kv ring, slot pos mod n_swa
    CompressorState main;            // ratio 4 or 128
    CompressorState index;           // ratio 4 only: indexer keys
};

// Host-side plan of one compression ratio for one micro-batch (§4.2, §4.3).
struct RatioPlan {
    int ratio = 0;
    int ring_rows = 0;                    // 2r with overlap, else r
    bool overlap = false;
    int64_t n_blocks = 0;                 // ceil(T / r): completed blocks plus dummies
    int64_t n_real = 0;                   // blocks this batch completes
    int64_t n_view = 0;                   // cache rows the batch may see
    int64_t dummy_row = 0;                // cache row that dummy blocks write
    std::vector<int32_t> ape_rows;        // [T] pos mod r
    std::vector<int32_t> member_rows;     // [members·n_blocks] rows of concat(ring, batch)
    std::vector<int32_t> block_pos;       // [n_blocks] j·r
    std::vector<int64_t> write_rows;      // [n_blocks] cache row of each block
    std::vector<int32_t> persist_src;     // batch rows kept in the ring ...
    std::vector<int64_t> persist_dst;     // ... and their ring rows
    std::vector<float> visible_mask;      // [n_view·T] 0 / -inf: block j visible to query t
    std::vector<int32_t> view_rows;       // [n_view] 0 … n_view−1 (reads a non-F32 cache as F32)
};

struct StepPlan {
    int64_t pos0 = 0;
    int64_t n_tokens = 0;
    std::vector<int32_t> positions;
    std::vector<int32_t> tokens;
    std::vector<float> window_mask;       // [(n_swa + T)·T]: ring slots, then the batch
    std::vector<int32_t> window_src;      // batch rows kept in the window ring ...
    std::vector<int64_t> window_dst;      // ... and their slots
    std::vector<int32_t> window_rows;     // 0 … n_swa−1 (reads a non-F32 ring as F32)
    bool has4 = false, has128 = false;
    RatioPlan r4, r128;
};

// Builds the plan of the batch [pos0, pos0+T) given the session geometry.
StepPlan make_plan(const dsv4_hparams & hp, int64_t pos0, const int32_t * tokens, int64_t n_tokens,
                   int64_t n_rows4, int64_t n_rows128, bool has4, bool has128);

enum class OutMode { NONE, LAST, ALL };  // which logits a micro-batch graph computes

// What decides the shape of a step's graph: a built graph serves every step with the same key.
// Decode steps cycle through a few keys (a block completes every 4th / 128th token).
struct GraphKey {
    int64_t n_tokens = -1, n_view4 = -1, n_view128 = -1;
    bool real4 = false, real128 = false;  // the batch completes a ratio-4 / ratio-128 block
    OutMode out = OutMode::ALL;
    bool operator==(const GraphKey & o) const {
        return n_tokens == o.n_tokens && n_view4 == o.n_view4 && n_view128 == o.n_view128 && real4 == o.real4 &&
               real128 == o.real128 && out == o.out;
    }
};
GraphKey graph_key(const StepPlan & p, OutMode out);

class Step {
  public:
    Step(ggml_context * ctx, const dsv4_hparams & hp, std::vector<LayerState> & layers, const StepPlan & plan);

    ggml_context * ctx;
    const dsv4_hparams & hp;
    const int64_t n_tokens;
    bool flash_attn = true;   // attention through ggml_flash_attn_ext (else matmul + softmax)
    bool cpu = true;          // the step computes on the CPU backend (CUDA sessions: false)
    ggml_tensor * positions;  // i32 [T]
    ggml_tensor * tokens;     // i32 [T]

    const RopeParams & rope(uint32_t il) const { return ropes_[il]; }

    // §3.4.4: the raw window — the ring of earlier tokens plus this batch's kv; the batch's
    // kv is written into the ring after everything else in the graph.
    KeySet window(uint32_t il, ggml_tensor * kv);

    // §3.5: compressor inputs from the plan.
    ggml_tensor * ape_rows(Stream st);
    ggml_tensor * block_positions(Stream st);
    CompressorRows compressor_rows(uint32_t il, Stream st, ggml_tensor * a, ggml_tensor * z);
    ggml_tensor * store(uint32_t il, Stream st, ggml_tensor * entries);

    // §3.4.4 / §3.6: compressed keys.
    KeySet with_all(uint32_t il, const KeySet & keys, ggml_tensor * cache);
    ggml_tensor * indexer_mask();
    KeySet with_selected(uint32_t il, const KeySet & keys, ggml_tensor * cache, ggml_tensor * scores);

    // The context's most recent tensor (nullptr when empty); tensors are only appended.
    ggml_tensor * last_tensor();

    // Uploads the plan into the input tensors (after the graph is allocated).
    void set_inputs() const;
    // Cache writes that must run even when no output depends on them (a micro-batch whose
    // logits nobody reads still extends the caches); expanded before deferred().
    const std::vector<ggml_tensor *> & effects() const { return effects_; }
    // Ring overwrites that must run after every read of the old ring contents (expanded last).
    const std::vector<ggml_tensor *> & deferred() const { return deferred_; }

  private:
    struct RatioInputs {
        ggml_tensor * ape_rows = nullptr;
        ggml_tensor * member_rows = nullptr;
        ggml_tensor * block_pos = nullptr;
        ggml_tensor * write_rows = nullptr;
        ggml_tensor * persist_src = nullptr;
        ggml_tensor * persist_dst = nullptr;
        ggml_tensor * visible_f32 = nullptr;
        ggml_tensor * visible_f16 = nullptr;
        ggml_tensor * view_rows = nullptr;
    };
    // `t` as F32 rows (a copy through get_rows when the cache holds another type)
    ggml_tensor * as_f32(ggml_tensor * t, ggml_tensor * rows);
    // the rows of a batch that a ring of `ring_rows` keeps (the last ones)
    ggml_tensor * kept_rows(ggml_tensor * batch, ggml_tensor * src, int64_t ring_rows);
    ggml_tensor * input(ggml_type type, int64_t ne0, int64_t ne1 = 1);
    RatioInputs & inputs(Stream st);
    const RatioPlan & ratio_plan(Stream st) const;
    CompressorState & state(uint32_t il, Stream st);

    std::vector<LayerState> & layers_;
    const StepPlan & plan_;
    std::vector<RopeParams> ropes_;
    ggml_tensor * window_mask_ = nullptr;
    ggml_tensor * window_src_ = nullptr;
    ggml_tensor * window_dst_ = nullptr;
    ggml_tensor * window_rows_ = nullptr;
    RatioInputs in4_, in128_;
    std::vector<ggml_tensor *> effects_;
    std::vector<ggml_tensor *> deferred_;
    ggml_tensor * tail_ = nullptr;
};

// Names the nodes a block function creates after the block, unless a nested block (or the code)
// named them first: DSV4_PROFILE totals time per block by these names.
class Scope {
  public:
    Scope(Step & s, const char * name);
    ~Scope();
    Scope(const Scope &) = delete;
    Scope & operator=(const Scope &) = delete;

  private:
    Step & s_;
    const char * name_;
    ggml_tensor * mark_;  // the context's last tensor when the block began (nullptr: none)
};

// Softmax attention of q ne{Dh, H, T} over a key set, with one sink logit per head (§3.4.5).
ggml_tensor * attend(Step & s, ggml_tensor * q, const KeySet & keys, ggml_tensor * sinks);

}  // namespace dsv4
