// The runtime side of one micro-batch graph: what the generated blocks (native/generated/
// blocks.cpp) call for everything that touches session state — the sliding window, the
// compressor states, the compressed caches and the per-step compression plan (spec §4).
//
// A Step is built on the host for a batch of T tokens: segments of one or more sequences, each
// a run of consecutive positions. Every data-dependent choice inside the step (indexer top-k,
// expert selection) stays in the graph; the host only supplies what follows from positions and
// sequence slots (masks, row indices).
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

// The keys of every query of a micro-batch (§3.4.4). K = V.
//
// A micro-batch holds segments of several sequences (one segment per sequence, consecutive
// positions each); every weight is applied to the whole batch at once, and each query attends
// only to its own sequence's keys. On the CPU the leading one-token segments (the decode group,
// one query per sequence) are attended together by the fused decode op, which reads each
// sequence's stored rows in place through per-query row bases; every other segment gets its own
// attention over its gathered keys.
struct SegmentKeys {
    int64_t offset = 0, n = 0;            // the segment's batch rows [offset, offset + n)
    ggml_tensor * shared = nullptr;       // ne{Dh, N}: keys every query of the segment may see
    ggml_tensor * shared_mask = nullptr;  // ne{N, n} f32: 0 visible, -inf hidden
    ggml_tensor * own = nullptr;          // ne{Dh, k, n}: keys picked per query (one-token CSA)
    ggml_tensor * own_mask = nullptr;     // ne{k, n} f32
};

struct GroupKeys {
    ggml_tensor * ring = nullptr;        // the window rings of every slot, ne{Dh, slots·ring rows}
    ggml_tensor * fresh = nullptr;       // ne{Dh, G}: each query's own key
    ggml_tensor * ring_mask = nullptr;   // ne{ring rows + 1, G}: its slot's ring rows, then its own key
    ggml_tensor * bases = nullptr;       // i32 ne{3, G}: the first row of its slot in the window ring,
                                         // the ratio-4 and the ratio-128 caches
    int cache_col = 0;                   // the column of `bases` of `cache`
    ggml_tensor * cache = nullptr;       // compressed entries of every slot, or null
    ggml_tensor * cache_mask = nullptr;  // ne{n, G}: n = picks per query, or the visible-row width
    ggml_tensor * cache_idx = nullptr;   // i32 ne{k, G}: picked rows within the slot (CSA), or null
};

struct KeySet {
    GroupKeys group;                     // ring == nullptr: no decode group
    std::vector<SegmentKeys> segments;   // the other segments, in batch order after the group
};

// The rows a compressor pools in one micro-batch: the rings of every slot (and a last, synthetic
// row: value 0, logit -inf, read for positions before 0) and this batch's rows (values and gate
// logits), and each block's members as rows of concat(rings, batch) (native/ops/ops.h:
// compress_pool gathers them itself, nothing is concatenated).
struct CompressorRows {
    ggml_tensor * ring_kv;     // ne{c·d, ring rows}
    ggml_tensor * kv;          // ne{c·d, T}
    ggml_tensor * ring_score;  // ne{c·d, ring rows}
    ggml_tensor * score;       // ne{c·d, T}
    ggml_tensor * members;     // i32 ne{members·n_blocks}
    int64_t n_blocks;
};

// Persistent per-layer state in the session's state buffer (§4.1), every sequence slot's rows
// stacked: slot s owns rows [s·rows, (s+1)·rows) of each tensor.
struct CompressorState {
    ggml_tensor * kv = nullptr;     // ne{c·d, slots·ring rows + 1}: values of the last tokens, row pos mod ring rows
    ggml_tensor * score = nullptr;  // ne{c·d, slots·ring rows + 1}: their gate logits (APE included)
    ggml_tensor * cache = nullptr;  // ne{d, slots·n_rows}: compressed entries, row j = block j; last row: dummy
};

struct LayerState {
    ggml_tensor * window = nullptr;  // ne{Dh, slots·window ring rows}: raw kv, slot row pos mod ring rows
    CompressorState main;            // ratio 4 or 128
    CompressorState index;           // ratio 4 only: indexer keys
    // the MTP block only (§3.10): the trunk's final streams of the slot's recent positions,
    // ne{HC·D, slots·window ring rows + 1}, row pos mod ring rows; the last row stays zero (the
    // state before position 0)
    ggml_tensor * xfin = nullptr;
};

// The ring geometry of a session: how many rows each ring keeps per sequence slot. Rings hold
// `slack` rows beyond what the next token needs (the window's n_swa − 1 earlier tokens, the
// compressors' previous and current block), so that a sequence can be rolled back by up to that
// many tokens without recomputing anything (Model.truncate).
struct Geometry {
    int64_t n_slots = 1;
    int64_t slack = 0;
    int64_t window_rows = 0;    // n_swa + slack
    int64_t ring4 = 0;          // 2·4 + slack (overlapping compressors: previous and current block)
    int64_t ring128 = 0;        // 128 + slack
    int64_t n_rows4 = 0;        // cache rows per slot: n_ctx/4 blocks plus one dummy row
    int64_t n_rows128 = 0;
    bool has4 = false, has128 = false;
};

Geometry make_geometry(const dsv4_hparams & hp, int64_t n_ctx, int64_t n_slots, int64_t slack);

// One sequence's part of a micro-batch.
struct Segment {
    int32_t slot = 0;
    int64_t pos0 = 0;    // position of its first token
    int64_t n = 0;       // tokens
    int64_t offset = 0;  // its first batch row
};

// Host-side plan of one compression ratio for one micro-batch (§4.2, §4.3).
struct RatioPlan {
    int ratio = 0;
    int64_t ring_rows = 0;                // per slot
    bool overlap = false;
    int64_t n_blocks = 0;                 // Σ ceil(n/r) over segments: completed blocks plus dummies
    int64_t n_real = 0;                   // blocks this batch completes
    int64_t n_view = 0;                   // cache rows per slot the batch may see (the same for every query)
    std::vector<int32_t> ape_rows;        // [T] pos mod r
    std::vector<int32_t> member_rows;     // [members·n_blocks] rows of concat(rings, batch)
    std::vector<int32_t> block_pos;       // [n_blocks] j·r
    std::vector<int64_t> write_rows;      // [n_blocks] cache row of each block
    std::vector<int32_t> persist_src;     // batch rows kept in the rings ...
    std::vector<int64_t> persist_dst;     // ... and their ring rows
    std::vector<float> visible_mask;      // [n_view·T] 0 / -inf: block j of its sequence visible to query t
    std::vector<int32_t> cache_base;      // [T] the first cache row of the query's slot
    std::vector<int32_t> segment_rows;    // [n_view] per non-group segment: its slot's cache rows 0 … n_view−1
};

struct StepPlan {
    int64_t n_tokens = 0;
    int64_t n_group = 0;                  // the leading one-token segments attended by the fused op
    std::vector<Segment> segments;        // the decode group first
    std::vector<int32_t> positions;
    std::vector<int32_t> tokens;
    int64_t window_rows = 0;              // ring rows per slot
    std::vector<float> group_mask;        // [(window_rows + 1)·G]: ring rows, then the query's own key
    std::vector<int32_t> group_bases;     // [3·G] each group query's first rows: window ring, caches r4, r128
    std::vector<std::vector<float>> segment_mask;  // per non-group segment [(window_rows + n)·n]
    std::vector<std::vector<int32_t>> segment_ring;  // per non-group segment: its slot's ring rows
    std::vector<int32_t> window_src;      // batch rows kept in the window rings ...
    std::vector<int64_t> window_dst;      // ... and their rows
    std::vector<int32_t> out_rows;        // batch rows whose logits are computed
    std::vector<int32_t> mtp_ring;        // [T] the xfin ring row a segment's first token reads (others: the zero row)
    std::vector<int32_t> mtp_prev;        // [T] the row of concat(those T ring rows, batch's final streams)
                                          // holding each token's previous position (MTP input, §3.10)
    bool has4 = false, has128 = false;
    RatioPlan r4, r128;
};

// Builds the plan of a batch whose segments (slot, pos0, n) are given in batch order, the
// one-token segments of the decode group (n_group of them) first; `tokens` holds the batch.
StepPlan make_plan(const dsv4_hparams & hp, const Geometry & geo, const std::vector<Segment> & segments,
                   int64_t n_group, const int32_t * tokens, std::vector<int32_t> out_rows);

// What decides the shape of a step's graph: a built graph serves every step with the same key.
// Decode steps cycle through a few keys (a block completes every 4th / 128th token).
struct GraphKey {
    int64_t n_tokens = -1, n_group = -1, n_view4 = -1, n_view128 = -1, n_out = -1;
    std::vector<int64_t> segment_lengths;  // the non-group segments'
    bool real4 = false, real128 = false;   // the batch completes a ratio-4 / ratio-128 block
    bool mtp_only = false;                 // an MTP draft step: the MTP block alone (§3.10)
    bool mtp_out = false;                  // the MTP block's logits are wanted (else only its rows run)
    bool operator==(const GraphKey & o) const {
        return n_tokens == o.n_tokens && n_group == o.n_group && n_view4 == o.n_view4 && n_view128 == o.n_view128 &&
               n_out == o.n_out && segment_lengths == o.segment_lengths && real4 == o.real4 && real128 == o.real128 &&
               mtp_only == o.mtp_only && mtp_out == o.mtp_out;
    }
};
GraphKey graph_key(const StepPlan & p);

class Step {
  public:
    Step(ggml_context * ctx, const dsv4_hparams & hp, std::vector<LayerState> & layers, const StepPlan & plan);

    ggml_context * ctx;
    const dsv4_hparams & hp;
    const int64_t n_tokens;
    const int64_t n_group;
    bool flash_attn = true;   // attention through ggml_flash_attn_ext (else matmul + softmax)
    bool cpu = true;          // the step computes on the CPU backend (CUDA sessions: false)
    ggml_tensor * positions;  // i32 [T]
    ggml_tensor * tokens;     // i32 [T]

    const RopeParams & rope(uint32_t il) const { return ropes_[il]; }
    const StepPlan & plan() const { return plan_; }

    // §3.4.4: the raw window — each sequence's ring of earlier tokens plus its tokens of this
    // batch; the batch's kv is written into the rings after everything else in the graph.
    KeySet window(uint32_t il, ggml_tensor * kv);

    // §3.5: compressor inputs from the plan.
    ggml_tensor * ape_rows(Stream st);
    ggml_tensor * block_positions(Stream st);
    CompressorRows compressor_rows(uint32_t il, Stream st, ggml_tensor * a, ggml_tensor * z);
    // writes the batch's new entries; returns the layer's whole cache (every slot), written
    ggml_tensor * store(uint32_t il, Stream st, ggml_tensor * entries);

    // §3.6: the indexer scores of every query against its own sequence's visible entries,
    // ne{n_view, T} (−inf where hidden).
    ggml_tensor * indexer_scores(uint32_t il, ggml_tensor * q, ggml_tensor * keys, ggml_tensor * w);

    // §3.4.4 / §3.6: compressed keys.
    KeySet with_all(uint32_t il, const KeySet & keys, ggml_tensor * cache);
    KeySet with_selected(uint32_t il, const KeySet & keys, ggml_tensor * cache, ggml_tensor * scores);

    // §3.10: each token's previous position's final streams ne{D, HC, T}: the slot's ring (zero
    // before position 0), else the batch's row before it in X (the batch's final trunk streams;
    // nullptr: a draft step, whose one-token segments read the ring only).
    ggml_tensor * mtp_prev(uint32_t il, ggml_tensor * X);
    // Writes X's rows (ne{D, HC, T}) into the MTP layer's ring of final streams, after every read:
    // the trunk's final streams, or a draft step's MTP output (the next draft row's state).
    void keep_final(uint32_t il, ggml_tensor * X);

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
        ggml_tensor * cache_base = nullptr;
        std::vector<ggml_tensor *> segment_rows;
    };
    // the rows of a batch that rings keep (each segment's last ones)
    ggml_tensor * kept_rows(ggml_tensor * batch, ggml_tensor * src, int64_t ring_rows);
    ggml_tensor * input(ggml_type type, int64_t ne0, int64_t ne1 = 1);
    RatioInputs & inputs(Stream st);
    const RatioPlan & ratio_plan(Stream st) const;
    CompressorState & state(uint32_t il, Stream st);
    // `keys` with every query's visible entries of `cache` (all of them, through the visible mask)
    KeySet with_cache(const KeySet & keys, ggml_tensor * cache, Stream st);

    std::vector<LayerState> & layers_;
    const StepPlan & plan_;
    std::vector<RopeParams> ropes_;
    ggml_tensor * group_mask_ = nullptr;
    ggml_tensor * group_bases_ = nullptr;
    std::vector<ggml_tensor *> segment_mask_;
    std::vector<ggml_tensor *> segment_ring_;
    ggml_tensor * window_src_ = nullptr;
    ggml_tensor * window_dst_ = nullptr;
    ggml_tensor * mtp_ring_ = nullptr;
    ggml_tensor * mtp_prev_ = nullptr;
    void window_inputs();
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

// Softmax attention of q ne{Dh, H, T} over a key set, with one sink logit per head (§3.4.5):
// each query over its own sequence's keys.
ggml_tensor * attend(Step & s, ggml_tensor * q, const KeySet & keys, ggml_tensor * sinks);

}  // namespace dsv4
