"""Our fused ops (native/ops/ops.h), each implementation against the float64 reference.

Each op runs alone through its C API entry (dsv4_op_*) on every backend this build and machine
have: the CPU always; CUDA where a device is present (tests/test_engine.py also runs the whole
model on DSV4_TEST_BACKEND). The engine tests check the same ops in context.
"""
from __future__ import annotations

import numpy as np
import pytest

from dsv4_ggml import _native
from dsv4_ggml.errors import InvalidArgumentError
from dsv4_ggml.model import BACKENDS
from dsv4_ggml.reference.compressor import pool_block
from dsv4_ggml.reference.indexer import indexer_topk


def _backends():
    _, lib = _native.load()
    return [b for b in BACKENDS if lib.dsv4_backend_available(BACKENDS[b])]


def compress_pool(backend, ring_kv, kv, ring_score, score, rows, n_blocks, overlap, n_threads=2):
    ffi, lib = _native.load()
    width, ring_rows, n_tokens = ring_kv.shape[1], ring_kv.shape[0], kv.shape[0]
    d = width // 2 if overlap else width
    out = np.empty((n_blocks, d), np.float32)
    f32 = [np.ascontiguousarray(a, np.float32) for a in (ring_kv, kv, ring_score, score)]
    rows = np.ascontiguousarray(rows, np.int32)
    ptr = lambda a, t: ffi.cast(t, a.ctypes.data)  # noqa: E731
    _native.check(lib.dsv4_op_compress_pool(
        BACKENDS[backend], n_threads, width, ring_rows, n_tokens, n_blocks, len(rows) // max(n_blocks, 1), overlap,
        *(ptr(a, "float *") for a in f32), ptr(rows, "int32_t *"), ptr(out, "float *")))
    return out


def expected(ring_kv, kv, ring_score, score, rows, n_blocks, overlap):
    """The reference's pooling (float64) over the members gathered from concat(ring, batch)."""
    v_all = np.concatenate([ring_kv, kv]).astype(np.float64)
    z_all = np.concatenate([ring_score, score]).astype(np.float64)
    members = rows.reshape(n_blocks, -1)
    v, z = v_all[members], z_all[members]                 # [nb, M, width]
    if overlap:                                           # previous half [0, d), current half [d, 2d)
        d, half = v.shape[2] // 2, members.shape[1] // 2
        v = np.concatenate([v[:, :half, :d], v[:, half:, d:]], axis=1)
        z = np.concatenate([z[:, :half, :d], z[:, half:, d:]], axis=1)
    return pool_block(v, z)


CASES = [  # (width, ring rows, tokens, blocks, members per block, overlap)
    (2 * 512, 8, 1, 1, 8, True),        # CSA decode step: one block from the ring + 1 token
    (2 * 128, 8, 37, 9, 8, True),       # indexer prefill micro-batch
    (512, 128, 1, 1, 128, False),       # HCA decode step
    (512, 128, 300, 2, 128, False),     # HCA prefill
    (2 * 100, 8, 13, 3, 8, True),       # d not a multiple of the CPU's 64-channel tile
    (72, 4, 5, 6, 4, False),            # more blocks than tokens (dummy blocks repeat a row)
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "w{}-S{}-T{}-nb{}-M{}{}".format(*c[:5], "-overlap" if c[5] else ""))
@pytest.mark.parametrize("n_threads", [1, 3])
def test_compress_pool_matches_the_reference(backend, case, n_threads):
    width, S, T, nb, M, overlap = case
    rng = np.random.default_rng(width + S + T + nb)
    ring_kv, kv = rng.standard_normal((S, width)), rng.standard_normal((T, width))
    ring_score, score = 3 * rng.standard_normal((S, width)), 3 * rng.standard_normal((T, width))
    if overlap:   # the ring rows of a block before position 0 hold logit −inf (weight exactly 0)
        ring_score[: S // 2] = -np.inf
    rows = rng.integers(0, S + T, nb * M).astype(np.int32)
    if overlap:   # the current half of each block is real: at least one finite logit per channel
        rows.reshape(nb, M)[:, M // 2:] = rng.integers(S // 2, S + T, (nb, M // 2))
    got = compress_pool(backend, ring_kv, kv, ring_score, score, rows, nb, overlap, n_threads)
    want = expected(ring_kv, kv, ring_score, score, rows, nb, overlap)
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{backend} {case} threads {n_threads}: max rel err {err:.1e}")
    assert np.isfinite(got).all()
    assert err < 1e-6


def test_compress_pool_rejects_bad_arguments():
    z = np.zeros((4, 8), np.float32)
    with pytest.raises(InvalidArgumentError, match="outside"):
        compress_pool("cpu", z, z, z, z, np.array([0, 8, 1, 2], np.int32), 1, False)
    with pytest.raises(InvalidArgumentError, match="bad shape"):
        compress_pool("cpu", z[:, :7], z[:, :7], z[:, :7], z[:, :7], np.arange(4, dtype=np.int32), 1, True)


def topk_mask(backend, scores, k, n_threads=2):
    """scores [T, n] (row t: query t) -> mask [T, n]."""
    ffi, lib = _native.load()
    scores = np.ascontiguousarray(scores, np.float32)
    out = np.empty_like(scores)
    _native.check(lib.dsv4_op_topk_mask(BACKENDS[backend], n_threads, scores.shape[1], scores.shape[0], k,
                                        ffi.cast("float *", scores.ctypes.data), ffi.cast("float *", out.ctypes.data)))
    return out


def expected_topk_mask(scores, k):
    """The reference's selection (indexer_topk: stable sort, ties to the lower block) as a mask."""
    n_visible = np.full(len(scores), scores.shape[1])
    picks = indexer_topk(scores.astype(np.float64), n_visible, k)
    want = np.full(scores.shape, -np.inf, np.float32)
    for t, row in enumerate(picks):
        row = row[(row >= 0) & np.isfinite(scores[t, np.maximum(row, 0)])]
        want[t, row] = 0.0
    return want


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("n,T,k", [(7, 3, 2), (175, 37, 16), (4096, 5, 512), (300, 1, 299), (64, 4, 100)])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_topk_mask_matches_the_reference_selection(backend, n, T, k, n_threads):
    rng = np.random.default_rng(n * T + k)
    scores = rng.standard_normal((T, n)).astype(np.float32)
    scores[:, ::7] = np.round(scores[:, ::7], 1)           # exact ties: the lower index wins
    for t in range(T):                                     # causal visibility: a prefix of the blocks
        scores[t, rng.integers(1, n + 1):] = -np.inf
    got = topk_mask(backend, scores, k, n_threads)
    want = expected_topk_mask(scores, k)
    assert np.array_equal(got, want)
    assert ((got == 0).sum(1) == np.minimum(k, np.isfinite(scores).sum(1))).all()


def topk_rows(backend, scores, k, n_threads=2):
    """scores [T, n] -> the picked block indices [T, k] (any order)."""
    ffi, lib = _native.load()
    scores = np.ascontiguousarray(scores, np.float32)
    out = np.empty((scores.shape[0], k), np.int32)
    _native.check(lib.dsv4_op_topk_rows(BACKENDS[backend], n_threads, scores.shape[1], scores.shape[0], k,
                                        ffi.cast("float *", scores.ctypes.data), ffi.cast("int32_t *", out.ctypes.data)))
    return out


@pytest.mark.parametrize("n,T,k", [(4096, 1, 512), (7, 3, 2), (300, 2, 300), (64, 1, 40)])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_topk_rows_picks_the_reference_selection(n, T, k, n_threads):
    rng = np.random.default_rng(n + T + k)
    scores = rng.standard_normal((T, n)).astype(np.float32)
    scores[:, ::5] = np.round(scores[:, ::5], 1)            # exact ties: the lower index wins
    scores[0, n // 2:] = -np.inf                           # fewer than k visible in the first query (n=64)
    got = topk_rows("cpu", scores, k, n_threads)
    for t in range(T):
        order = sorted(range(n), key=lambda j: (-scores[t, j], j))   # the reference's stable order
        assert sorted(got[t].tolist()) == sorted(order[:k])


def test_topk_mask_rejects_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="bad shape"):
        topk_mask("cpu", np.zeros((2, 4), np.float32), 0)
    with pytest.raises(InvalidArgumentError, match="bad shape"):
        topk_rows("cpu", np.zeros((2, 4), np.float32), 5)


KEY_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}
BAD_KEY_TYPES = {"q4_0": 2}


def indexer_scores(backend, q, keys, weights, mask, key_type="f32", n_threads=2, base=None):
    """q [T, H, Dh], keys [rows, Dh] (floats, stored as key_type; uint8: the stored bytes), weights
    [T, H], mask [T, n], base [T] (each query's first key row) or None -> [T, n]."""
    ffi, lib = _native.load()
    T, H, Dh = q.shape
    n = mask.shape[1]
    stored = np.ascontiguousarray(keys) if keys.dtype == np.uint8 else quantize_keys(keys, key_type)
    q, weights, mask = (np.ascontiguousarray(a, np.float32) for a in (q, weights, mask))
    base = None if base is None else np.ascontiguousarray(base, np.int32)
    out = np.empty((T, n), np.float32)
    ptr = lambda a, t="float *": ffi.NULL if a is None else ffi.cast(t, a.ctypes.data)  # noqa: E731
    type_id = KEY_TYPES.get(key_type, BAD_KEY_TYPES.get(key_type))
    _native.check(lib.dsv4_op_indexer_scores(BACKENDS[backend], n_threads, Dh, H, T, n, keys.shape[0], type_id,
                                             ptr(q), ptr(stored, "void *"), ptr(weights), ptr(mask),
                                             ptr(base, "int32_t *"), ptr(out)))
    return out


def quantize_keys(keys, key_type):
    """The bytes of `keys` in the cache type (gguf's quantizers: the same rounding as ggml's)."""
    from gguf import GGMLQuantizationType, quants
    if key_type == "f32":
        return np.ascontiguousarray(keys, np.float32)
    qt = {"f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}[key_type]
    return np.ascontiguousarray(quants.quantize(np.asarray(keys, np.float32), qt))


def stored_keys(keys, key_type):
    """The keys as the op reads them back (float64)."""
    from gguf import GGMLQuantizationType, quants
    if key_type == "f32":
        return np.asarray(keys, np.float32).astype(np.float64)
    qt = {"f16": GGMLQuantizationType.F16, "bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0}[key_type]
    return quants.dequantize(quantize_keys(keys, key_type), qt).astype(np.float64).reshape(keys.shape)


INDEXER_CASES = [  # (head_dim, heads, tokens, keys)
    (128, 16, 1, 4096),     # decode step at depth 16k (the bench model's indexer)
    (128, 64, 1, 300),      # DeepSeek-V4-Flash's 64 heads; keys not a multiple of the 64-key chunk
    (128, 16, 37, 175),     # a prefill micro-batch
    (64, 5, 3, 9),          # heads not a multiple of 16, fewer keys than one 8-key block
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", INDEXER_CASES, ids=lambda c: "Dh{}-H{}-T{}-n{}".format(*c))
@pytest.mark.parametrize("key_type", list(KEY_TYPES))
@pytest.mark.parametrize("n_threads", [1, 3])
def test_indexer_scores_match_the_reference(backend, case, key_type, n_threads):
    from dsv4_ggml.reference.indexer import indexer_scores as reference_scores
    Dh, H, T, n = case
    rng = np.random.default_rng(Dh * H + T * n)
    q = rng.standard_normal((T, H, Dh)).astype(np.float32)
    keys = rng.standard_normal((n, Dh)).astype(np.float32)
    weights = (rng.standard_normal((T, H)) / np.sqrt(Dh * H)).astype(np.float32)
    # causal visibility: query t sees a prefix of the keys (the last query sees them all)
    visible = np.arange(n)[None, :] < np.linspace(max(1, n // 3), n, T).astype(int)[:, None]
    mask = np.where(visible, 0.0, -np.inf).astype(np.float32)
    got = indexer_scores(backend, q, keys, weights, mask, key_type, n_threads)
    want = reference_scores(q.astype(np.float64), weights.astype(np.float64), stored_keys(keys, key_type)) + mask
    assert np.array_equal(np.isinf(got), ~visible)
    err = np.abs(got[visible] - want[visible]).max() / np.abs(want[visible]).max()
    print(f"{backend} {case} {key_type} threads {n_threads}: max rel err {err:.1e}")
    assert err < 1e-5


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("key_type", ["f32", "f16"])
def test_indexer_scores_read_each_querys_own_rows(backend, key_type):
    """Several sequences' caches stacked in one tensor (a batch across sequences): each query scores
    the rows from its own base; rows past the tensor's end score -inf."""
    from dsv4_ggml.reference.indexer import indexer_scores as reference_scores
    Dh, H, n, slots, rows_per_slot = 128, 16, 70, 3, 80
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((slots * rows_per_slot, Dh)).astype(np.float32)
    base = np.array([2 * rows_per_slot, 0, rows_per_slot, 2 * rows_per_slot + 40])   # the last runs past the end
    T = len(base)
    q = rng.standard_normal((T, H, Dh)).astype(np.float32)
    weights = (rng.standard_normal((T, H)) / np.sqrt(Dh * H)).astype(np.float32)
    nvis = np.array([70, 5, 33, 70])
    mask = np.where(np.arange(n)[None, :] < nvis[:, None], 0.0, -np.inf).astype(np.float32)
    got = indexer_scores(backend, q, keys, weights, mask, key_type, base=base)
    stored = stored_keys(keys, key_type)
    for t in range(T):
        rows = base[t] + np.arange(n)
        inside = rows < len(keys)
        want = np.full(n, -np.inf)
        want[inside] = reference_scores(q[t:t + 1].astype(np.float64), weights[t:t + 1].astype(np.float64),
                                        stored[rows[inside]])[0]
        want += mask[t]
        vis = np.isfinite(want)
        assert np.array_equal(np.isfinite(got[t]), vis), t
        assert np.abs(got[t][vis] - want[vis]).max() / np.abs(want[vis]).max() < 1e-5


def test_indexer_scores_reject_bad_arguments():
    z = np.zeros((1, 1, 8), np.float32)
    with pytest.raises(InvalidArgumentError, match="not a multiple"):
        indexer_scores("cpu", z, np.zeros((4, 34), np.uint8), np.zeros((1, 1)), np.zeros((1, 4)), "q8_0")
    with pytest.raises(InvalidArgumentError, match="key type"):
        indexer_scores("cpu", z, np.zeros((4, 18), np.uint8), np.zeros((1, 1)), np.zeros((1, 4)), "q4_0")


def attend_decode(backend, q, sinks, scale, ring, fresh, ring_mask, cache=None, cache_mask=None, cache_idx=None,
                  key_type="f32", n_threads=2, bases=None, n_ring=None):
    """One query: q [H, Dh], fresh [Dh], ring_mask [n_ring + 1], cache_mask [n], cache_idx [n] -> [H, Dh].
    G queries: q [G, H, Dh], fresh [G, Dh], ring_mask [G, n_ring + 1], cache_mask / cache_idx [G, n],
    bases [G, 2] (first ring row, first cache row) -> [G, H, Dh]. sinks [H]; ring [rows, Dh] and
    cache [C, Dh] are floats, stored as key_type."""
    ffi, lib = _native.load()
    single = q.ndim == 2
    if single:
        q, fresh, ring_mask = q[None], fresh[None], ring_mask[None]
        cache_mask = None if cache_mask is None else cache_mask[None]
        cache_idx = None if cache_idx is None else cache_idx[None]
    G, H, Dh = q.shape
    f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
    q, sinks, fresh, ring_mask = f32(q), f32(sinks), f32(fresh), f32(ring_mask)
    ring_b = quantize_keys(ring, key_type)
    cache_b = quantize_keys(cache, key_type) if cache is not None else None
    cache_mask = f32(cache_mask) if cache_mask is not None else None
    idx = np.ascontiguousarray(cache_idx, np.int32) if cache_idx is not None else None
    bases = None if bases is None else np.ascontiguousarray(bases, np.int32)
    n_ring = ring.shape[0] if n_ring is None else n_ring
    out = np.empty((G, H, Dh), np.float32)
    ptr = lambda a, t="float *": ffi.NULL if a is None else ffi.cast(t, a.ctypes.data)  # noqa: E731
    n_cache = 0 if cache is None else (cache.shape[0] if cache_mask is None else cache_mask.shape[1])
    _native.check(lib.dsv4_op_attend_decode(
        BACKENDS[backend], n_threads, Dh, H, G, n_ring, ring.shape[0], n_cache,
        0 if cache is None else cache.shape[0], 0 if idx is None else idx.shape[1], KEY_TYPES[key_type], scale,
        ptr(q), ptr(sinks), ptr(ring_b, "void *"), ptr(fresh), ptr(ring_mask), ptr(bases, "int32_t *"),
        ptr(cache_b, "void *"), ptr(cache_mask), ptr(idx, "int32_t *"), ptr(out)))
    return out[0] if single else out


ATTEND_CASES = [  # (head_dim, heads, window, cache rows, picked rows (0: all), visible window rows)
    (512, 8, 128, 4096, 512, 128),    # CSA decode step at depth 16k (the bench model)
    (512, 8, 128, 128, 0, 128),       # HCA decode step at depth 16k
    (512, 8, 128, 0, 0, 128),         # sliding-window layer
    (512, 64, 128, 300, 64, 37),      # DeepSeek-V4-Flash's 64 heads; a window not yet full
    (64, 5, 16, 9, 0, 3),             # small and odd: heads, keys not a multiple of the 8-key block
    (72, 3, 4, 20, 7, 4),             # head_dim not a multiple of 16
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", ATTEND_CASES, ids=lambda c: "Dh{}-H{}-W{}-C{}-k{}-v{}".format(*c))
@pytest.mark.parametrize("key_type", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_attend_decode_matches_the_reference(backend, case, key_type, n_threads):
    from dsv4_ggml.reference.attention import sparse_attention
    Dh, H, W, C, k, n_vis = case
    rng = np.random.default_rng(Dh + H * W + C + k)
    q = rng.standard_normal((H, Dh)).astype(np.float32)
    sinks = rng.standard_normal(H).astype(np.float32)
    ring = rng.standard_normal((W, Dh)).astype(np.float32)
    fresh = rng.standard_normal(Dh).astype(np.float32)
    ring_mask = np.concatenate([np.where(np.arange(W) < n_vis, 0.0, -np.inf), [0.0]]).astype(np.float32)
    cache = rng.standard_normal((C, Dh)).astype(np.float32) if C else None
    cache_mask = cache_idx = None
    keys = [stored_keys(ring, key_type)[:n_vis], fresh[None].astype(np.float64)]
    if C and k:                       # picked rows, the last two invalid picks (masked)
        cache_idx = rng.choice(C, k, replace=False)
        cache_mask = np.where(np.arange(k) < k - 2, 0.0, -1e30).astype(np.float32)
        keys.append(stored_keys(cache, key_type)[cache_idx[:k - 2]])
    elif C:                           # every row, the last third hidden
        vis = np.arange(C) < C - C // 3
        cache_mask = np.where(vis, 0.0, -np.inf).astype(np.float32)
        keys.append(stored_keys(cache, key_type)[vis])
    scale = 1.0 / np.sqrt(Dh)
    got = attend_decode(backend, q * 4, sinks, scale, ring, fresh, ring_mask, cache, cache_mask, cache_idx,
                        key_type, n_threads)
    allk = np.concatenate(keys)[None]
    want = sparse_attention((q * 4).astype(np.float64)[None], allk, np.ones((1, allk.shape[1]), bool),
                            sinks.astype(np.float64), scale)[0]
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"{backend} {case} {key_type} threads {n_threads}: max rel err {err:.1e}")
    assert err < 1e-5


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("picked", [False, True], ids=["all-rows", "picked-rows"])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_attend_decode_attends_each_query_to_its_own_sequence(backend, picked, n_threads):
    """A decode step of several sequences at once: the rings and caches of 3 slots stacked in one
    tensor each; every query reads its own slot's rows (from its bases) and no other."""
    from dsv4_ggml.reference.attention import sparse_attention
    Dh, H, W, slots, C = 64, 5, 12, 3, 40
    rng = np.random.default_rng(11 + picked)
    ring = rng.standard_normal((slots * W, Dh)).astype(np.float32)
    cache = rng.standard_normal((slots * C, Dh)).astype(np.float32)
    seq = np.array([2, 0, 1, 2])             # the queries' slots (two queries of slot 2)
    G = len(seq)
    q = rng.standard_normal((G, H, Dh)).astype(np.float32) * 3
    fresh = rng.standard_normal((G, Dh)).astype(np.float32)
    sinks = rng.standard_normal(H).astype(np.float32)
    nvis_ring = np.array([12, 3, 7, 9])
    ring_mask = np.concatenate([np.where(np.arange(W)[None, :] < nvis_ring[:, None], 0.0, -np.inf),
                                np.zeros((G, 1))], axis=1)
    bases = np.stack([seq * W, seq * C], axis=1)
    if picked:
        k = 6
        idx = np.stack([rng.choice(C, k, replace=False) for _ in range(G)])
        idx[1, -1] = -1                      # an invalid pick is never attended
        cache_mask = np.zeros((G, k), np.float32)
        cache_mask[2, :2] = -np.inf          # hidden picks
        rows = [[bases[g, 1] + i for i, mv in zip(idx[g], cache_mask[g]) if i >= 0 and mv == 0] for g in range(G)]
    else:
        idx = None
        nvis = np.array([40, 1, 17, 25])
        cache_mask = np.where(np.arange(C)[None, :] < nvis[:, None], 0.0, -np.inf).astype(np.float32)
        rows = [list(bases[g, 1] + np.arange(nvis[g])) for g in range(G)]
    scale = 1.0 / np.sqrt(Dh)
    got = attend_decode(backend, q, sinks, scale, ring, fresh, ring_mask, cache, cache_mask, idx,
                        n_threads=n_threads, bases=bases, n_ring=W)
    for g in range(G):
        keys = np.concatenate([ring[bases[g, 0]:bases[g, 0] + nvis_ring[g]], fresh[g:g + 1], cache[rows[g]]])
        want = sparse_attention(q[g].astype(np.float64)[None], keys.astype(np.float64)[None],
                                np.ones((1, len(keys)), bool), sinks.astype(np.float64), scale)[0]
        err = np.abs(got[g] - want).max() / np.abs(want).max()
        assert err < 1e-5, (g, err)


def test_attend_decode_rejects_bad_arguments():
    z = np.zeros((2, 8), np.float32)
    with pytest.raises(InvalidArgumentError, match="bad shape"):      # an empty window ring
        attend_decode("cpu", z, np.zeros(2), 1.0, np.zeros((0, 8)), np.zeros(8), np.zeros(1))
    ffi, lib = _native.load()
    buf = np.zeros(64, np.float32)
    p = ffi.cast("float *", buf.ctypes.data)
    with pytest.raises(InvalidArgumentError, match="cache_idx"):      # picked rows but no indices
        _native.check(lib.dsv4_op_attend_decode(0, 1, 8, 2, 1, 4, 4, 3, 3, 2, 0, 1.0, p, p, p, p, p, ffi.NULL, p, p,
                                                ffi.NULL, p))
