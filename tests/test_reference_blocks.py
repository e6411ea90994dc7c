"""Hand-computed checks of each block of the NumPy reference (spec §3), on small inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dsv4_ggml.reference import (
    CompressorState, RowCache, WindowRing, compress_block, compress_kv, hc_head, hc_post, hc_pre,
    indexer_topk, moe_layer, rms_norm, rope, rope_freqs, route, router_scores, sinkhorn, sparse_attention,
    swiglu_clamp, window_indices, yarn_corr_dims, yarn_freqs,
)


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# --- mHC (§3.2) -------------------------------------------------------------------------------

def test_sinkhorn_rows_and_columns_sum_to_one():
    logits = np.random.default_rng(0).normal(size=(5, 4, 4))
    c = sinkhorn(logits, 20, 1e-6)
    row_err = np.abs(c.sum(-1) - 1).max()
    col_err = np.abs(c.sum(-2) - 1).max()
    print(f"row-sum err {row_err:.2e}, col-sum err {col_err:.2e}")
    assert col_err < 1e-5 and row_err < 1e-3
    assert (c > 0).all()


def test_sinkhorn_matches_hand_written_two_iterations():
    # a large eps makes every ε placement of §3.2 step 7 visible
    L = np.random.default_rng(1).normal(size=(4, 4))
    eps = 0.05
    C = [[0.0] * 4 for _ in range(4)]
    for s in range(4):
        den = sum(math.exp(L[s, d]) for d in range(4))
        for d in range(4):
            C[s][d] = math.exp(L[s, d]) / den + eps
    def col_step():
        sums = [sum(C[s][d] for s in range(4)) for d in range(4)]
        for s in range(4):
            for d in range(4):
                C[s][d] /= sums[d] + eps
    def row_step():
        sums = [sum(C[s][d] for d in range(4)) for s in range(4)]
        for s in range(4):
            for d in range(4):
                C[s][d] /= sums[s] + eps
    col_step()
    row_step()
    col_step()
    got = sinkhorn(L[None], 2, eps)[0]
    err = np.abs(got - np.array(C)).max()
    print(f"sinkhorn(2 iters, eps 0.05) vs loops: {err:.2e}")
    assert err < 1e-15
    # one iteration = softmax + ε + a single column step
    assert not np.allclose(sinkhorn(L[None], 1, eps)[0], got)


def _hc_case(seed=2, T=3, hc=4, D=8):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(T, hc, D))
    fn = rng.normal(size=((2 + hc) * hc, hc * D)) / np.sqrt(hc * D)
    scale = rng.uniform(0.5, 1.5, size=3)
    base = rng.normal(size=(2 + hc) * hc) * 0.5
    return X, fn, scale, base


def test_hc_pre_matches_explicit_loops():
    X, fn, scale, base = _hc_case()
    norm_eps, hc_eps, iters = 0.01, 0.05, 3
    y, post, comb = hc_pre(X, fn, scale, base, iters, norm_eps, hc_eps)
    T, hc, D = X.shape
    for t in range(T):
        v = [X[t, s, i] for s in range(hc) for i in range(D)]  # stream 0 first
        rms = math.sqrt(sum(a * a for a in v) / len(v) + norm_eps)  # one RMS over all streams, norm_eps
        m = [sum(fn[k, i] * v[i] for i in range(len(v))) / rms for k in range(fn.shape[0])]
        pre = [_sig(m[h] * scale[0] + base[h]) + hc_eps for h in range(hc)]
        post_ref = [2 * _sig(m[hc + h] * scale[1] + base[hc + h]) for h in range(hc)]
        logits = np.array([[m[2 * hc + hc * s + d] * scale[2] + base[2 * hc + hc * s + d] for d in range(hc)]
                           for s in range(hc)])
        y_ref = [sum(pre[h] * X[t, h, i] for h in range(hc)) for i in range(D)]
        assert np.abs(y[t] - y_ref).max() < 1e-13
        assert np.abs(post[t] - post_ref).max() < 1e-14
        assert np.abs(comb[t] - sinkhorn(logits[None], iters, hc_eps)[0]).max() < 1e-14


def test_hc_post_matches_explicit_loops():
    X, fn, scale, base = _hc_case(seed=3)
    _, post, comb = hc_pre(X, fn, scale, base, 20, 1e-6, 1e-6)
    f = np.random.default_rng(4).normal(size=(X.shape[0], X.shape[2]))
    out = hc_post(f, X, post, comb)
    T, hc, D = X.shape
    for t in range(T):
        for d in range(hc):
            want = post[t, d] * f[t] + sum(comb[t, s, d] * X[t, s] for s in range(hc))  # comb[src, dst]
            assert np.abs(out[t, d] - want).max() < 1e-14


def test_hc_head_is_pre_weighted_stream_sum():
    X, fn, scale, base = _hc_case(seed=5)
    fn4, base4 = fn[:4], base[:4]
    y = hc_head(X, fn4, scale[:1], base4, 0.01, 0.05)
    flat = X.reshape(len(X), -1)
    m = rms_norm(flat, None, 0.01) @ fn4.T
    pre = 1 / (1 + np.exp(-(m * scale[0] + base4))) + 0.05
    assert np.abs(y - np.einsum("th,thd->td", pre, X)).max() < 1e-14


# --- RoPE / YaRN (§1.3, §3.4.3) -----------------------------------------------------------------

def test_rope_rotates_interleaved_tail_pairs_and_keeps_nope_dims():
    rng = np.random.default_rng(6)
    T, H, d, n_rot = 3, 2, 16, 8
    x = rng.normal(size=(T, H, d))
    pos = np.array([0, 5, 1000])
    freqs = rope_freqs(n_rot, 10000.0)
    y = rope(x, pos, freqs)
    assert np.array_equal(y[..., :d - n_rot], x[..., :d - n_rot])  # bit-identical nope dims
    for t in range(T):
        for h in range(H):
            for i in range(n_rot // 2):
                a = pos[t] * 10000.0 ** (-2 * i / n_rot)
                x0, x1 = x[t, h, d - n_rot + 2 * i], x[t, h, d - n_rot + 2 * i + 1]
                assert abs(y[t, h, d - n_rot + 2 * i] - (x0 * math.cos(a) - x1 * math.sin(a))) < 1e-12
                assert abs(y[t, h, d - n_rot + 2 * i + 1] - (x0 * math.sin(a) + x1 * math.cos(a))) < 1e-12
    back = rope(y, pos, freqs, inverse=True)
    err = np.abs(back - x).max()
    print(f"inverse rope round trip: {err:.2e}")
    assert err < 1e-14
    assert np.array_equal(back[..., :d - n_rot], x[..., :d - n_rot])


def test_yarn_correction_range_and_frequencies_match_spec_numbers():
    assert yarn_corr_dims(64, 160000.0, 65536, 32, 1) == (15, 25)
    f = 160000.0 ** (-2 * np.arange(32) / 64)
    fy = yarn_freqs(64, 160000.0, 16.0, 65536)
    assert np.allclose(fy[:16], f[:16], rtol=1e-15, atol=0)  # pairs 0-15 keep f_i
    assert np.allclose(fy[25:], f[25:] / 16, rtol=1e-15, atol=0)  # pairs 25-31 use f_i/16
    ramp = (np.arange(16, 25) - 15) / 10  # pairs 16-24 blend linearly
    assert np.allclose(fy[16:25], f[16:25] * (1 - ramp) + f[16:25] / 16 * ramp, rtol=1e-15, atol=0)
    # general form: low is clamped at 0 (corr(32) < 0 for a short original context)
    assert yarn_corr_dims(64, 160000.0, 100, 32, 1) == (0, 8)


# --- attention pieces (§3.4) ----------------------------------------------------------------

def test_window_holds_exactly_w_keys_including_the_query():
    W = 5
    pos = np.arange(12)
    idx, valid = window_indices(pos, 0, W)
    for t in pos:
        keys = set(idx[t][valid[t]].tolist())
        assert keys == set(range(max(0, t - W + 1), t + 1))
    # the ring keeps W-1 rows of history for the next query, in position order
    ring = WindowRing(W, 2)
    rows = np.arange(24, dtype=float).reshape(12, 2)
    ring.write(rows[:7])
    ring.write(rows[7:9])
    hist, first = ring.history()
    assert first == 9 - (W - 1) and np.array_equal(hist, rows[first:9])


def test_attention_sink_only_enlarges_the_denominator():
    rng = np.random.default_rng(7)
    T, H, N, d = 2, 3, 6, 8
    q, keys = rng.normal(size=(T, H, d)), rng.normal(size=(T, N, d))
    valid = np.ones((T, N), dtype=bool)
    valid[0, 4:] = False
    scale = 1 / math.sqrt(d)
    no_sink = sparse_attention(q, keys, valid, np.full(H, -np.inf), scale)
    sinks = np.array([0.3, -1.0, 2.0])
    with_sink = sparse_attention(q, keys, valid, sinks, scale)
    for t in range(T):
        for h in range(H):
            s = [(q[t, h] @ keys[t, k]) * scale for k in range(N) if valid[t, k]]
            plain = sum(math.exp(v) for v in s)
            factor = plain / (plain + math.exp(sinks[h]))  # sink is a raw (unscaled) logit
            assert np.abs(with_sink[t, h] - factor * no_sink[t, h]).max() < 1e-14
            want = sum(math.exp(v) * keys[t, k] for v, k in zip(s, np.nonzero(valid[t])[0])) / plain
            assert np.abs(no_sink[t, h] - want).max() < 1e-14


def test_indexer_topk_keeps_all_visible_then_best_k_lowest_index_on_ties():
    scores = np.array([[5.0, 1.0, 9.0, 3.0, 0.0, 0.0, 7.0],
                       [5.0, 0.0, 9.0, 0.0, 0.0, 0.0, 7.0],
                       [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    n_visible = np.array([3, 6, 7])
    sel = indexer_topk(scores, n_visible, 3)
    assert set(sel[0][sel[0] >= 0]) == {0, 1, 2}  # nvis <= k: every visible block
    assert set(sel[1]) == {0, 2, 1}  # tie at 0.0 among blocks 1, 3, 4, 5 -> lowest index; 6 invisible
    assert set(sel[2]) == {4, 5, 6}


# --- compressor (§3.5, §4.2) -----------------------------------------------------------------

def _compressor_weights(rng, ratio, d, D=6, prefix="attn_compressor"):
    c = 2 if ratio == 4 else 1
    return {f"{prefix}_kv": rng.normal(size=(c * d, D)), f"{prefix}_gate": rng.normal(size=(c * d, D)),
            f"{prefix}_ape": rng.normal(size=(ratio, c * d)), f"{prefix}_norm": 1 + 0.1 * rng.normal(size=d)}


@pytest.mark.parametrize("ratio", [4, 128])
def test_compressed_entry_count_after_t_tokens_is_floor_t_over_ratio(ratio):
    rng = np.random.default_rng(8)
    d = 4
    w = _compressor_weights(rng, ratio, d)
    state, cache = CompressorState(ratio, d), RowCache(d)
    freqs = rope_freqs(2, 10000.0)
    t = 0
    for n in [1, 3, 2, 7, 1, 130, 5, 128, 13, 1]:
        compress_kv(rng.normal(size=(n, 6)), np.arange(t, t + n), w, "attn_compressor", state, cache, 1e-6, freqs)
        t += n
        assert len(cache) == t // ratio, (t, len(cache))


def test_csa_block0_previous_half_gets_weight_exactly_zero():
    rng = np.random.default_rng(9)
    d = 3
    state = CompressorState(4, d)
    a, z = rng.normal(size=(4, 2 * d)), rng.normal(size=(4, 2 * d))
    ids, values, logits = state.append(a, z)
    assert ids.tolist() == [0]
    assert np.all(logits[0, :4] == -np.inf) and np.all(values[0, :4] == 0)
    assert np.array_equal(values[0, 4:], a[:, d:]) and np.array_equal(logits[0, 4:], z[:, d:])
    w = np.exp(z[:, d:] - z[:, d:].max(0))
    u = (w / w.sum(0) * a[:, d:]).sum(0)
    norm = np.ones(d)
    entry = compress_block(values, logits, norm, 1e-6, ids, 4, rope_freqs(2, 10000.0))
    assert np.abs(entry[0] - rms_norm(u, norm, 1e-6)).max() < 1e-15  # position 0: rope is identity


def test_csa_block_pools_previous_first_half_and_current_second_half_roped_at_block_start():
    rng = np.random.default_rng(10)
    d, D = 4, 6
    w = _compressor_weights(rng, 4, d, D)
    x = rng.normal(size=(12, D))
    pos = np.arange(12)
    state, cache = CompressorState(4, d), RowCache(d)
    freqs = rope_freqs(2, 160000.0)
    compress_kv(x[:5], pos[:5], w, "attn_compressor", state, cache, 1e-6, freqs)
    compress_kv(x[5:], pos[5:], w, "attn_compressor", state, cache, 1e-6, freqs)
    a = x @ w["attn_compressor_kv"].T
    z = x @ w["attn_compressor_gate"].T + w["attn_compressor_ape"][pos % 4]  # APE on the logits only
    for j in (1, 2):
        vals = np.concatenate([a[4 * j - 4:4 * j, :d], a[4 * j:4 * j + 4, d:]])
        logit = np.concatenate([z[4 * j - 4:4 * j, :d], z[4 * j:4 * j + 4, d:]])
        u = np.array([np.dot(np.exp(logit[:, c]) / np.exp(logit[:, c]).sum(), vals[:, c]) for c in range(d)])
        want = rope(rms_norm(u, w["attn_compressor_norm"], 1e-6)[None], np.array([4 * j]), freqs)[0]
        err = np.abs(cache.rows[j] - want).max()
        print(f"CSA block {j}: {err:.2e}")
        assert err < 1e-13


def test_hca_pooling_is_a_per_channel_softmax_over_tokens():
    rng = np.random.default_rng(11)
    r, d = 128, 3
    values, logits = rng.normal(size=(1, r, d)), rng.normal(size=(1, r, d)) * 3
    norm = np.ones(d)
    entry = compress_block(values, logits, norm, 1e-6, np.array([0]), r, rope_freqs(2, 10000.0))
    u = []
    for c in range(d):
        e = [math.exp(logits[0, s, c]) for s in range(r)]
        u.append(sum(e[s] * values[0, s, c] for s in range(r)) / sum(e))
    assert np.abs(entry[0] - rms_norm(np.array(u), norm, 1e-6)).max() < 1e-14
    # HCA state holds only the current block
    state = CompressorState(r, d)
    ids, _, _ = state.append(rng.normal(size=(130, d)), rng.normal(size=(130, d)))
    assert ids.tolist() == [0] and state.first_pos == 128


# --- MoE (§3.8) ------------------------------------------------------------------------------

def test_sqrt_softplus_routing_selects_by_score_plus_bias_but_weights_by_score():
    logits = np.array([[2.0, 1.0, 0.5, -1.0]])
    scores = np.sqrt(np.log1p(np.exp(logits)))
    assert np.abs(router_scores(np.ones((1, 4)), np.diag(logits[0])) - scores).max() < 1e-15
    bias = np.array([0.0, 0.0, 0.0, 5.0])  # bias pushes expert 3 into the top-2
    sel, wts = route(scores, 2, bias=bias, weights_scale=1.5)
    assert set(sel[0]) == {0, 3}
    p = {e: scores[0, e] for e in (0, 3)}
    for e, g in zip(sel[0], wts[0]):
        assert abs(g - 1.5 * p[e] / (p[0] + p[3])) < 1e-15


def test_hash_routing_follows_the_lut_row_of_the_token_id():
    rng = np.random.default_rng(12)
    D, F, E, V = 5, 3, 4, 6
    w = {"ffn_gate_inp": rng.normal(size=(E, D)), "ffn_gate_tid2eid": rng.integers(0, E, size=(V, 2)),
         "ffn_gate_exps": rng.normal(size=(E, F, D)), "ffn_up_exps": rng.normal(size=(E, F, D)),
         "ffn_down_exps": rng.normal(size=(E, D, F))}
    w["ffn_gate_tid2eid"][:, 1] = (w["ffn_gate_tid2eid"][:, 0] + 1) % E
    hp = {"n_hash_layers": 1, "n_expert_used": 2, "expert_weights_scale": 1.5, "expert_weights_norm": True,
          "swiglu_clamp_exp": [0.7], "swiglu_clamp_shexp": [0.7], "n_expert_shared": 0}
    x = rng.normal(size=(3, D))
    tokens = np.array([4, 1, 4])
    out = moe_layer(x, tokens, w, hp, 0)
    for t in range(3):
        p = np.sqrt(np.logaddexp(0, w["ffn_gate_inp"] @ x[t]))
        experts = w["ffn_gate_tid2eid"][tokens[t]]
        want = np.zeros(D)
        for e in experts:
            h = swiglu_clamp(w["ffn_gate_exps"][e] @ x[t], w["ffn_up_exps"][e] @ x[t], 0.7)
            want += 1.5 * p[e] / p[experts].sum() * (w["ffn_down_exps"][e] @ h)
        assert np.abs(out[t] - want).max() < 1e-13


def test_swiglu_clamp_caps_gate_before_silu_and_up_on_both_sides():
    gate = np.array([5.0, -5.0, 0.5, 5.0])
    up = np.array([3.0, -3.0, 0.25, -0.5])
    got = swiglu_clamp(gate, up, 1.0)
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    want = [silu(1.0) * 1.0, silu(-5.0) * -1.0, silu(0.5) * 0.25, silu(1.0) * -0.5]
    assert np.abs(got - want).max() < 1e-15
    # clamping after SiLU instead would give min(silu(5), 1) = 1 ≠ silu(1)
    assert abs(got[0] - 1.0) > 0.2
