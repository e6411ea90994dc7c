"""Manifold-constrained hyper-connections: HC pre / post, Sinkhorn, HC head (spec §3.2).

The residual state of a token is ``X ∈ R^{HC×D}`` (``HC`` streams); batched arrays are
``[T, HC, D]``. The comb matrix is indexed ``[src, dst]`` (§7 #9).
"""

from __future__ import annotations

import numpy as np

from .common import rms_norm, sigmoid, softmax


def sinkhorn(logits: np.ndarray, iters: int, eps: float) -> np.ndarray:
    """Sinkhorn on comb logits ``[..., src, dst]`` with the exact ε placement of §3.2 step 7 / §7 #7.

    Softmax over dst, then +ε everywhere, then a column step; then ``iters − 1`` × (row step,
    column step). Every step divides by ``(sum + ε)``. "row" = fixed src (sum over dst),
    "column" = fixed dst (sum over src).
    """
    if iters < 1:
        raise ValueError(f"sinkhorn needs iters >= 1, got {iters}")
    c = softmax(logits, axis=-1) + eps
    c = c / (np.sum(c, axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (np.sum(c, axis=-1, keepdims=True) + eps)
        c = c / (np.sum(c, axis=-2, keepdims=True) + eps)
    return c


def hc_mixes(X: np.ndarray, fn: np.ndarray, norm_eps: float) -> np.ndarray:
    """``m = fn · RMS0(v)`` with ``v`` the stream-major flattening of ``X`` (one RMS over HC·D, §7 #10)."""
    T = X.shape[0]
    v = X.reshape(T, -1)
    return rms_norm(v, None, norm_eps) @ fn.T


def hc_pre(X: np.ndarray, fn: np.ndarray, scale: np.ndarray, base: np.ndarray,
           sinkhorn_iters: int, norm_eps: float, hc_eps: float):
    """HC pre for one site. ``X [T, HC, D]`` -> ``(y [T, D], post [T, HC], comb [T, HC(src), HC(dst)])``.

    ``y`` is the weighted sum of the un-normalised streams; the block then applies its own norm.
    """
    T, hc, _ = X.shape
    m = hc_mixes(X, fn, norm_eps)
    pre = sigmoid(m[:, :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2.0 * sigmoid(m[:, hc:2 * hc] * scale[1] + base[hc:2 * hc])  # no ε on post (§7 #8)
    comb_logits = (m[:, 2 * hc:] * scale[2] + base[2 * hc:]).reshape(T, hc, hc)  # index 4·src + dst
    comb = sinkhorn(comb_logits, sinkhorn_iters, hc_eps)
    y = np.einsum("th,thd->td", pre, X)
    return y, post, comb


def hc_post(f: np.ndarray, X: np.ndarray, post: np.ndarray, comb: np.ndarray) -> np.ndarray:
    """``X'[dst] = post[dst]·f + Σ_src comb[src, dst]·X[src]``; ``X`` is the state that entered hc_pre."""
    return post[:, :, None] * f[:, None, :] + np.matmul(comb.transpose(0, 2, 1), X)


def hc_head(X: np.ndarray, fn: np.ndarray, scale: np.ndarray, base: np.ndarray,
            norm_eps: float, hc_eps: float) -> np.ndarray:
    """Collapse the streams after the last block: ``y = Σ_h (sigmoid(m_h·scale + base_h) + ε)·X[h]``."""
    m = hc_mixes(X, fn, norm_eps)
    pre = sigmoid(m * scale[0] + base) + hc_eps
    return np.einsum("th,thd->td", pre, X)
