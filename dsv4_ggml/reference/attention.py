"""Attention of one layer: q low-rank, shared MQA kv, window + compressed keys, sinks, grouped output (§3.4).

Every query t attends to one list of keys (§3.7): its raw window (``W`` tokens incl. itself) then
the compressed entries it may see — all visible ones (HCA, ratio 128) or the indexer's top-k
(CSA, ratio 4). Keys are also the values (K = V).
"""

from __future__ import annotations

import numpy as np

from .common import rms_norm
from .compressor import compress_kv
from .indexer import indexer_query, indexer_scores, indexer_topk, indexer_topk_margins, indexer_weights
from .rope import rope
from .state import LayerState


def query_proj(x: np.ndarray, w: dict, hp: dict, positions: np.ndarray, freqs: np.ndarray):
    """``(q [T, H, Dh], qr [T, q_lora_rank])``: qr = RMSNorm(W_qa·x); per-head RMS0; rope tail (§3.4.1)."""
    eps = hp["norm_eps"]
    qr = rms_norm(x @ w["attn_q_a"].T, w["attn_q_a_norm"], eps)
    q = (qr @ w["attn_q_b"].T).reshape(len(x), hp["n_head"], hp["head_dim"])
    q = rms_norm(q, None, eps)
    return rope(q, positions, freqs), qr


def kv_proj(x: np.ndarray, w: dict, hp: dict, positions: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """The single shared key = value vector ``[T, Dh]``: RMSNorm(W_kv·x; kv_norm), rope tail (§3.4.2)."""
    kv = rms_norm(x @ w["attn_kv"].T, w["attn_kv_a_norm"], hp["norm_eps"])
    return rope(kv, positions, freqs)


def window_indices(positions: np.ndarray, first_pos: int, window: int):
    """Raw-window key rows per query: positions ``t−W+1 … t`` (incl. t, §7 #20) as rows of a key array
    whose row 0 is position ``first_pos``. Returns ``(idx [T, W], valid [T, W])``."""
    key_pos = positions[:, None] - (window - 1) + np.arange(window)[None, :]
    valid = key_pos >= 0
    return np.where(valid, key_pos - first_pos, 0), valid


def sparse_attention(q: np.ndarray, keys: np.ndarray, valid: np.ndarray, sinks: np.ndarray,
                     softmax_scale: float) -> np.ndarray:
    """Softmax attention with one sink logit per head (§3.4.5). ``q [T, H, Dh]``, ``keys [T, N, Dh]``.

    The sink is a raw logit next to the scaled scores (not scaled itself, §7 #27); it only enlarges
    the denominator.
    """
    scores = np.matmul(q, keys.transpose(0, 2, 1)) * softmax_scale  # [T, H, N]
    scores = np.where(valid[:, None, :], scores, -np.inf)
    m = np.maximum(np.max(scores, axis=-1), sinks[None, :])  # [T, H]
    p = np.exp(scores - m[..., None])
    denom = np.sum(p, axis=-1) + np.exp(sinks[None, :] - m)
    return np.matmul(p, keys) / denom[..., None]


def grouped_out_proj(o: np.ndarray, wo_a: np.ndarray, wo_b: np.ndarray) -> np.ndarray:
    """``out = W_ob · concat_g(A_g · o_g)`` with ``o_g`` = heads of group g (§3.4.6). ``wo_a [G, R, H·Dh/G]``."""
    T = len(o)
    G = wo_a.shape[0]
    o_groups = o.reshape(T, G, -1)
    z = np.einsum("tgi,gri->tgr", o_groups, wo_a)
    return z.reshape(T, -1) @ wo_b.T


def indexer_select(x: np.ndarray, qr: np.ndarray, positions: np.ndarray, n_visible: np.ndarray, w: dict,
                   hp: dict, keys: np.ndarray, freqs: np.ndarray, margins=None, il: int = -1) -> np.ndarray:
    """CSA block selection ``[T, k]`` (−1 = unused) among the blocks visible to each query (§3.6)."""
    nh, hd = hp["indexer_n_head"], hp["indexer_head_dim"]
    q = indexer_query(qr, w["indexer.attn_q_b"], positions, nh, hd, freqs)
    weights = indexer_weights(x, w["indexer.proj"], nh, hd)
    scores = indexer_scores(q, weights, keys)
    if margins is not None:
        margins.add("indexer", il, indexer_topk_margins(scores, n_visible, hp["indexer_top_k"]))
    return indexer_topk(scores, n_visible, hp["indexer_top_k"])


def compressed_candidates(x: np.ndarray, qr: np.ndarray, positions: np.ndarray, w: dict, hp: dict,
                          state: LayerState, freqs: np.ndarray, margins=None, il: int = -1) -> np.ndarray:
    """Run the layer's compressors, then list per query the compressed entries it attends to (§3.4.4).

    Returns ``[T, n]`` entry ids, −1 = unused: every visible block (HCA) or the indexer's top-k (CSA).
    Blocks completed by tokens of this batch are written first, so the completing token sees them.
    """
    compress_kv(x, positions, w, "attn_compressor", state.compressor, state.compressed, hp["norm_eps"], freqs)
    n_visible = (positions + 1) // state.ratio
    if state.ratio == 128:
        ids = np.arange(len(state.compressed))[None, :]
        return np.where(ids < n_visible[:, None], ids, -1)
    compress_kv(x, positions, w, "indexer_compressor", state.indexer_compressor, state.indexer_keys,
                hp["norm_eps"], freqs)
    if len(state.indexer_keys) == 0:
        return np.zeros((len(x), 0), dtype=np.int64)
    return indexer_select(x, qr, positions, n_visible, w, hp, state.indexer_keys.rows, freqs, margins, il)


def attention_layer(x: np.ndarray, positions: np.ndarray, w: dict, hp: dict, state: LayerState,
                    freqs: np.ndarray, margins=None, il: int = -1) -> np.ndarray:
    """Attention of one layer for a batch of consecutive tokens; updates ``state``. ``x``: attn-normed input."""
    q, qr = query_proj(x, w, hp, positions, freqs)
    kv = kv_proj(x, w, hp, positions, freqs)

    history, first_pos = state.window.history()
    idx, valid = window_indices(positions, first_pos, hp["n_swa"])
    keys = np.concatenate([history, kv])[idx]
    state.window.write(kv)

    if state.ratio:
        comp_ids = compressed_candidates(x, qr, positions, w, hp, state, freqs, margins, il)
        keys = np.concatenate([keys, state.compressed.rows[np.maximum(comp_ids, 0)]], axis=1)
        valid = np.concatenate([valid, comp_ids >= 0], axis=1)

    o = sparse_attention(q, keys, valid, w["attn_sinks"], 1.0 / np.sqrt(hp["head_dim"]))
    # K = V carries rotated tail dims: rotate the output back by the query position (§7 #5)
    o = rope(o, positions, freqs, inverse=True)
    return grouped_out_proj(o, w["attn_output_a"], w["attn_output_b"])
