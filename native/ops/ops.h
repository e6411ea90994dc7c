// Our own fused ggml ops (GGML_OP_CUSTOM): a CPU implementation that ggml's CPU backend runs
// and, in CUDA builds, a CUDA twin that ggml-cuda runs through the custom-op hook our patch adds
// (vendor/ggml/patches/0003-cuda-custom-ops.patch). Both are checked against the float64
// reference by tests/test_ops.py (through the dsv4_op_* C entries) and, end to end, by the engine
// tests.
#pragma once

#include "ggml.h"

#include <cstdint>

namespace dsv4::ops {

// First op_params slot (int32) free for an op's own parameters: ggml_custom_4d keeps its call
// (function, task count, userdata: 24 bytes) in the first ones.
constexpr int kParamSlot = 8;
static_assert(sizeof(ggml_tensor::op_params) >= (kParamSlot + 1) * sizeof(int32_t), "op_params too small");

// The contiguous share [begin, end) of n work items that CPU thread ith of nth computes.
struct Share {
    int64_t begin, end;
};
inline Share thread_share(int64_t n, int ith, int nth) {
    const int64_t per = (n + nth - 1) / nth;
    const int64_t begin = per * ith < n ? per * ith : n;
    return {begin, begin + per < n ? begin + per : n};
}

// Compressor pooling, fused (§3.5, §7 #18, #19): for each block b and channel i < d,
//
//   pooled[i, b] = Σ_m softmax_m(z_m[f(m) + i])·v_m[f(m) + i]
//
// where member m of block b is row rows[m + M·b] of concat(ring, batch) (rows below S = the ring's
// row count are ring rows, the others batch rows − S), and f(m) is the feature offset: with
// overlapping blocks (ring width 2d, ratio 4) the first M/2 members (the previous block's tokens)
// read features [0, d) and the rest [d, 2d); otherwise (width d) every member reads [0, d).
// Replaces two concats and two gathers of every member row plus the halves' copies, a permuted
// softmax, a product and a row sum: 13–17 graph nodes and their buffers.
//
//   ring_kv, ring_score: F32 ne{c·d, S}   the compressor ring: values, gate logits (APE included)
//   kv, score:           F32 ne{c·d, T}   this batch's values and gate logits
//   rows:                I32 ne{M·n_blocks}
//   result:              F32 ne{d, n_blocks}, d = c·d / 2 when `overlap`, else c·d
ggml_tensor * compress_pool(ggml_context * ctx, ggml_tensor * ring_kv, ggml_tensor * kv, ggml_tensor * ring_score,
                            ggml_tensor * score, ggml_tensor * rows, int64_t n_blocks, bool overlap);

// The CPU implementation (ggml_custom_op_t): channels of every block split over the threads.
void compress_pool_cpu(ggml_tensor * dst, int ith, int nth, void * userdata);

// Indexer top-k as an attention mask, fused (§3.6): for each query t (column of `scores`, F32
// ne{n, T}, −inf where block j is not visible to t), 0 at its k highest finite scores (exact
// ties: the lower block index, as the reference's stable sort) and −inf elsewhere; every finite
// score when there are at most k. Replaces top_k, a gather of the picked scores, two fills, a
// scatter and the mask addition (batch steps; a decode step gathers its k entries instead).
ggml_tensor * topk_mask(ggml_context * ctx, ggml_tensor * scores, int64_t k);

void topk_mask_cpu(ggml_tensor * dst, int ith, int nth, void * userdata);

// The indexer's top-k of a decode step as block indices (§3.6): for each column t of `scores`
// (F32 ne{n, T}), the indices of its k highest scores, in no particular order (exact ties: the
// lower index; −inf scores are picked only when fewer than k are finite). Result: I32 ne{k, T}.
// ggml_top_k's CPU version partially sorts the whole column in one thread; this is a selection.
// CPU only: CUDA steps use ggml_top_k, which ggml-cuda implements.
ggml_tensor * topk_rows(ggml_context * ctx, ggml_tensor * scores, int64_t k);

void topk_rows_cpu(ggml_tensor * dst, int ith, int nth, void * userdata);

// Lightning indexer scores (§3.6), the op of ggml_lightning_indexer (which ggml-cuda lacks):
//
//   out[j, t] = Σ_h w[h, t]·max(0, q[:, h, t]·k[:, base[t] + j]) + mask[j, t]
//
// Each query scores n keys, rows base[t] … base[t] + n − 1 of `keys` (its own sequence's rows in
// a cache that stacks several sequences; without `base`, rows 0 … n − 1 for every query). The CPU
// implementation broadcasts each key element against 16 heads of the query at once (the heads
// transposed), 8 keys at a time, and skips keys the mask hides. Work: (query, 64 keys).
//
//   q:    F32 ne{Dh, H, T}      the indexer queries (roped)
//   keys: ne{Dh, rows}          the compressed indexer cache rows (F32, F16, BF16, Q8_0, ...)
//   w:    F32 ne{H, T}          per-head weights (prescaled)
//   mask: F16 or F32 ne{n, T}   0 where key j is visible to query t, −inf elsewhere
//   base: I32 ne{T} or null     each query's first key row
//   result: F32 ne{n, T}
ggml_tensor * indexer_scores(ggml_context * ctx, ggml_tensor * q, ggml_tensor * keys, ggml_tensor * w, ggml_tensor * mask,
                             ggml_tensor * base = nullptr);

void indexer_scores_cpu(ggml_tensor * dst, int ith, int nth, void * userdata);

// Attention of decode queries over MQA keys (= values), fused (§3.4.4, §3.4.5): for each query g
// (one per sequence) and head h,
//
//   out[:, h, g] = Σ_j e^{s_hj}·k_j / (Σ_j e^{s_hj} + e^{sinks[h]}),   s_hj = scale·q[:, h, g]·k_j + mask_j
//
// over the query's window ring rows (rows bases[0, g] … bases[0, g] + n_ring − 1 of `ring`, a
// tensor that stacks the rings of several sequences), its own key and (CSA/HCA layers) its
// sequence's compressed entries (rows from bases[cache_col, g]): all of its first n, or those
// `cache_idx` picks. Rows are read in place in the cache type and converted once for all heads;
// keys whose mask is −inf are skipped. Replaces the gathers of the F16 rows as F32, the key and
// mask concatenations, the mask cast and flash attention, which reads every key once per head.
// Work: (query, head) pairs, split over the threads. The CUDA twin (a block per query and head)
// is tested alone; CUDA decode steps keep ggml's flash attention until it is measured on a GPU.
//
//   q:          F32 ne{Dh, H, G}    the queries (roped)
//   sinks:      F32 ne{H}           per-head sink logits
//   ring:       ne{Dh, rows}        the window rings (F32, F16, BF16, Q8_0, ...)
//   fresh:      F32 ne{Dh, G}       each query's own key
//   ring_mask:  F32 ne{n_ring + 1, G}  its ring rows', then its own key's
//   bases:      I32 ne{B, G}        its first ring row (column 0) and first cache row (column cache_col)
//   cache:      ne{Dh, C} or null   compressed entries
//   cache_mask: F32 ne{n, G}        n = picks per query (with cache_idx), else visible-row width
//   cache_idx:  I32 ne{n, G} or null  the picked rows, counted from its first cache row (CSA decode)
//   result:     F32 ne{Dh, H, G}
ggml_tensor * attend_decode(ggml_context * ctx, ggml_tensor * q, ggml_tensor * sinks, float scale, ggml_tensor * ring,
                            ggml_tensor * fresh, ggml_tensor * ring_mask, ggml_tensor * bases, int cache_col,
                            ggml_tensor * cache, ggml_tensor * cache_mask, ggml_tensor * cache_idx);

void attend_decode_cpu(ggml_tensor * dst, int ith, int nth, void * userdata);

#ifdef DSV4_WITH_CUDA
// The CUDA twins: `stream` is the cudaStream_t ggml-cuda computes the graph on.
void compress_pool_cuda(ggml_tensor * dst, void * stream);
void topk_mask_cuda(ggml_tensor * dst, void * stream);
void indexer_scores_cuda(ggml_tensor * dst, void * stream);
void attend_decode_cuda(ggml_tensor * dst, void * stream);

// Registers every CUDA twin with ggml-cuda (idempotent).
void register_cuda_ops();
#endif

}  // namespace dsv4::ops
