// The C API of our fused ops (native/ops/ops.h): each runs alone in a one-op graph on a chosen
// backend, so that tests check every implementation (CPU, CUDA) against the reference.
#include "dsv4.h"

#include "backend.h"
#include "error.h"
#include "ops.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <functional>
#include <vector>

namespace {

using dsv4::fail;

// One op on one backend: inputs (type, shape, host data) in, the result's bytes out.
struct Input {
    ggml_type type;
    int64_t ne0, ne1;
    const void * data;
    int64_t ne2 = 1;
};

// The ggml type of an op's cache rows of head_dim values, as the C entries take it: f32, f16, bf16
// or q8_0 (the cache types), whole blocks per row.
ggml_type key_row_type(const char * name, int32_t key_type, int64_t head_dim) {
    const ggml_type kt = ggml_type(key_type);
    if (kt != GGML_TYPE_F32 && kt != GGML_TYPE_F16 && kt != GGML_TYPE_BF16 && kt != GGML_TYPE_Q8_0) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "%s: key type %d is not f32, f16, bf16 or q8_0", name, int(key_type));
    }
    if (head_dim % ggml_blck_size(kt) != 0) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "%s: head_dim %lld is not a multiple of %s blocks", name, (long long) head_dim,
             ggml_type_name(kt));
    }
    return kt;
}

void run_op(const char * name, int32_t backend, int32_t n_threads, const std::vector<Input> & inputs,
            const std::function<ggml_tensor *(ggml_context *, const std::vector<ggml_tensor *> &)> & build, void * out) {
    ggml_init_params ip = {ggml_tensor_overhead() * (inputs.size() + 4) + ggml_graph_overhead(), nullptr, true};
    ggml_context_ptr ctx(ggml_init(ip));
    if (ctx == nullptr) {
        fail(DSV4_ERR_OUT_OF_MEMORY, "%s: cannot create a context", name);
    }
    ggml_backend_ptr be(dsv4::make_backend(backend, n_threads > 0 ? n_threads : 1));
    std::vector<ggml_tensor *> ts;
    for (const Input & in : inputs) {
        ts.push_back(ggml_new_tensor_3d(ctx.get(), in.type, in.ne0, in.ne1, in.ne2));
        ggml_set_input(ts.back());
    }
    ggml_tensor * res = build(ctx.get(), ts);
    ggml_cgraph * gf = ggml_new_graph(ctx.get());
    ggml_build_forward_expand(gf, res);
    if (!ggml_backend_supports_op(be.get(), res)) {
        fail(DSV4_ERR_BACKEND, "%s: backend %s does not run the op", name, ggml_backend_name(be.get()));
    }
    ggml_backend_buffer_ptr buf(ggml_backend_alloc_ctx_tensors(ctx.get(), be.get()));
    if (buf == nullptr) {
        fail(DSV4_ERR_OUT_OF_MEMORY, "%s: cannot allocate the tensors", name);
    }
    for (size_t i = 0; i < inputs.size(); ++i) {
        ggml_backend_tensor_set(ts[i], inputs[i].data, 0, ggml_nbytes(ts[i]));
    }
    if (ggml_backend_graph_compute(be.get(), gf) != GGML_STATUS_SUCCESS) {
        fail(DSV4_ERR_INTERNAL, "%s: the graph failed on %s", name, ggml_backend_name(be.get()));
    }
    ggml_backend_tensor_get(res, out, 0, ggml_nbytes(res));
}

}  // namespace

dsv4_status dsv4_op_compress_pool(int32_t backend, int32_t n_threads, int64_t width, int64_t ring_rows, int64_t n_tokens,
                                  int64_t n_blocks, int64_t members, bool overlap, const float * ring_kv,
                                  const float * kv, const float * ring_score, const float * score,
                                  const int32_t * rows, float * out) {
    return dsv4::guarded([&] {
        for (const void * p : {(const void *) ring_kv, (const void *) kv, (const void *) ring_score, (const void *) score,
                               (const void *) rows, (const void *) out}) {
            dsv4::require(p, "compress_pool: every buffer");
        }
        if (width < 1 || ring_rows < 1 || n_tokens < 1 || n_blocks < 1 || members < 1 ||
            (overlap && (width % 2 != 0 || members % 2 != 0))) {
            fail(DSV4_ERR_INVALID_ARGUMENT, "compress_pool: bad shape (width %lld, ring %lld, tokens %lld, blocks %lld, "
                 "members %lld, overlap %d)", (long long) width, (long long) ring_rows, (long long) n_tokens,
                 (long long) n_blocks, (long long) members, int(overlap));
        }
        for (int64_t i = 0; i < members * n_blocks; ++i) {
            if (rows[i] < 0 || rows[i] >= ring_rows + n_tokens) {
                fail(DSV4_ERR_INVALID_ARGUMENT, "compress_pool: rows[%lld] = %d is outside the %lld ring and batch rows",
                     (long long) i, int(rows[i]), (long long) (ring_rows + n_tokens));
            }
        }
        run_op("compress_pool", backend, n_threads,
               {{GGML_TYPE_F32, width, ring_rows, ring_kv}, {GGML_TYPE_F32, width, n_tokens, kv},
                {GGML_TYPE_F32, width, ring_rows, ring_score}, {GGML_TYPE_F32, width, n_tokens, score},
                {GGML_TYPE_I32, members * n_blocks, 1, rows}},
               [&](ggml_context * ctx, const std::vector<ggml_tensor *> & t) {
                   return dsv4::ops::compress_pool(ctx, t[0], t[1], t[2], t[3], t[4], n_blocks, overlap);
               },
               out);
    });
}

dsv4_status dsv4_op_topk_mask(int32_t backend, int32_t n_threads, int64_t n, int64_t n_tokens, int64_t k,
                              const float * scores, float * out) {
    return dsv4::guarded([&] {
        dsv4::require(scores, "scores");
        dsv4::require(out, "out");
        if (n < 1 || n_tokens < 1 || k < 1) {
            fail(DSV4_ERR_INVALID_ARGUMENT, "topk_mask: bad shape (n %lld, tokens %lld, k %lld)", (long long) n,
                 (long long) n_tokens, (long long) k);
        }
        run_op("topk_mask", backend, n_threads, {{GGML_TYPE_F32, n, n_tokens, scores}},
               [&](ggml_context * ctx, const std::vector<ggml_tensor *> & t) {
                   return dsv4::ops::topk_mask(ctx, t[0], k);
               },
               out);
    });
}

dsv4_status dsv4_op_indexer_scores(int32_t backend, int32_t n_threads, int64_t head_dim, int64_t n_head, int64_t n_tokens,
                                   int64_t n_keys, int64_t n_rows, int32_t key_type, const float * q, const void * keys,
                                   const float * weights, const float * mask, const int32_t * base, float * out) {
    return dsv4::guarded([&] {
        for (const void * p : {(const void *) q, keys, (const void *) weights, (const void *) mask, (const void *) out}) {
            dsv4::require(p, "indexer_scores: every buffer but base");
        }
        if (head_dim < 1 || n_head < 1 || n_tokens < 1 || n_keys < 1 || n_rows < 1 || (base == nullptr && n_rows < n_keys)) {
            fail(DSV4_ERR_INVALID_ARGUMENT, "indexer_scores: bad shape (head_dim %lld, heads %lld, tokens %lld, keys %lld, "
                 "rows %lld)", (long long) head_dim, (long long) n_head, (long long) n_tokens, (long long) n_keys,
                 (long long) n_rows);
        }
        const ggml_type kt = key_row_type("indexer_scores", key_type, head_dim);
        std::vector<Input> in = {{GGML_TYPE_F32, head_dim, n_head, q, n_tokens}, {kt, head_dim, n_rows, keys},
                                 {GGML_TYPE_F32, n_head, n_tokens, weights}, {GGML_TYPE_F32, n_keys, n_tokens, mask}};
        if (base != nullptr) {
            in.push_back({GGML_TYPE_I32, n_tokens, 1, base});
        }
        run_op("indexer_scores", backend, n_threads, in,
               [&](ggml_context * ctx, const std::vector<ggml_tensor *> & t) {
                   return dsv4::ops::indexer_scores(ctx, t[0], t[1], t[2], t[3], base != nullptr ? t[4] : nullptr);
               },
               out);
    });
}

dsv4_status dsv4_op_attend_decode(int32_t backend, int32_t n_threads, int64_t head_dim, int64_t n_head, int64_t n_queries,
                                  int64_t n_ring, int64_t n_ring_rows, int64_t n_cache, int64_t n_cache_rows,
                                  int64_t n_picked, int32_t key_type, float scale, const float * q, const float * sinks,
                                  const void * ring, const float * fresh, const float * ring_mask, const int32_t * bases,
                                  const void * cache, const float * cache_mask, const int32_t * cache_idx, float * out) {
    return dsv4::guarded([&] {
        for (const void * p : {(const void *) q, (const void *) sinks, ring, (const void *) fresh, (const void *) ring_mask,
                               (const void *) out}) {
            dsv4::require(p, "attend_decode: q, sinks, ring, fresh, ring_mask and out");
        }
        if (head_dim < 1 || n_head < 1 || n_queries < 1 || n_ring < 1 || n_ring_rows < 1 || n_cache < 0 ||
            n_cache_rows < 0 || n_picked < 0 || (bases == nullptr && (n_ring > n_ring_rows || n_cache > n_cache_rows))) {
            fail(DSV4_ERR_INVALID_ARGUMENT, "attend_decode: bad shape (head_dim %lld, heads %lld, queries %lld, ring %lld of "
                 "%lld rows, cache %lld of %lld rows, picked %lld)", (long long) head_dim, (long long) n_head,
                 (long long) n_queries, (long long) n_ring, (long long) n_ring_rows, (long long) n_cache,
                 (long long) n_cache_rows, (long long) n_picked);
        }
        const bool has_cache = n_cache_rows > 0;
        if (has_cache && (cache == nullptr || cache_mask == nullptr || (n_picked > 0) != (cache_idx != nullptr) ||
                          (n_picked == 0 && n_cache < 1))) {
            fail(DSV4_ERR_INVALID_ARGUMENT, "attend_decode: a cache needs its rows and mask, and cache_idx exactly when "
                 "n_picked > 0");
        }
        const ggml_type kt = key_row_type("attend_decode", key_type, head_dim);
        std::vector<int32_t> zero_bases;
        if (bases == nullptr) {
            zero_bases.assign(size_t(2 * n_queries), 0);
            bases = zero_bases.data();
        }
        std::vector<Input> in = {{GGML_TYPE_F32, head_dim, n_head, q, n_queries}, {GGML_TYPE_F32, n_head, 1, sinks},
                                 {kt, head_dim, n_ring_rows, ring},              {GGML_TYPE_F32, head_dim, n_queries, fresh},
                                 {GGML_TYPE_F32, n_ring + 1, n_queries, ring_mask}, {GGML_TYPE_I32, 2, n_queries, bases}};
        if (has_cache) {
            in.push_back({kt, head_dim, n_cache_rows, cache});
            in.push_back({GGML_TYPE_F32, n_picked > 0 ? n_picked : n_cache, n_queries, cache_mask});
            if (n_picked > 0) {
                in.push_back({GGML_TYPE_I32, n_picked, n_queries, cache_idx});
            }
        }
        run_op("attend_decode", backend, n_threads, in,
               [&](ggml_context * ctx, const std::vector<ggml_tensor *> & t) {
                   return dsv4::ops::attend_decode(ctx, t[0], t[1], scale, t[2], t[3], t[4], t[5], 1,
                                                   has_cache ? t[6] : nullptr, has_cache ? t[7] : nullptr,
                                                   n_picked > 0 ? t[8] : nullptr);
               },
               out);
    });
}

dsv4_status dsv4_op_topk_rows(int32_t backend, int32_t n_threads, int64_t n, int64_t n_tokens, int64_t k,
                              const float * scores, int32_t * out) {
    return dsv4::guarded([&] {
        dsv4::require(scores, "scores");
        dsv4::require(out, "out");
        if (n < 1 || n_tokens < 1 || k < 1 || k > n) {
            fail(DSV4_ERR_INVALID_ARGUMENT, "topk_rows: bad shape (n %lld, tokens %lld, k %lld)", (long long) n,
                 (long long) n_tokens, (long long) k);
        }
        run_op("topk_rows", backend, n_threads, {{GGML_TYPE_F32, n, n_tokens, scores}},
               [&](ggml_context * ctx, const std::vector<ggml_tensor *> & t) {
                   return dsv4::ops::topk_rows(ctx, t[0], k);
               },
               out);
    });
}
