"""Lightning indexer: picks which compressed blocks a CSA (ratio-4) query attends to (§3.6)."""

from __future__ import annotations

import numpy as np

from .rope import rope


def indexer_query(qr: np.ndarray, w_q_b: np.ndarray, positions: np.ndarray, n_head: int,
                  head_dim: int, freqs: np.ndarray) -> np.ndarray:
    """``qI [T, n_head, head_dim]`` from the q low-rank ``qr``; no per-head norm (§7 #15), rope on the tail."""
    q = (qr @ w_q_b.T).reshape(len(qr), n_head, head_dim)
    return rope(q, positions, freqs)


def indexer_weights(x: np.ndarray, w_proj: np.ndarray, n_head: int, head_dim: int) -> np.ndarray:
    """Per-head weights ``w [T, n_head] = (W_proj·x) / sqrt(head_dim·n_head)``."""
    return (x @ w_proj.T) / np.sqrt(head_dim * n_head)


def indexer_scores(q: np.ndarray, weights: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``score[t, j] = Σ_h w[t, h]·max(0, qI[t, h]·K_j)`` for every cached key (mask applied later)."""
    dots = np.maximum(q @ keys.T, 0.0)  # [T, n_head, n_comp]
    return np.einsum("th,thj->tj", weights, dots)


def _visible_scores(scores: np.ndarray, n_visible: np.ndarray) -> np.ndarray:
    visible = np.arange(scores.shape[1])[None, :] < n_visible[:, None]
    return np.where(visible, scores, -np.inf)


def indexer_topk(scores: np.ndarray, n_visible: np.ndarray, top_k: int) -> np.ndarray:
    """Selected block ids ``[T, min(top_k, n_comp)]``, ``−1`` where unused.

    All ``n_visible[t]`` blocks when they are ``≤ top_k``, else the ``top_k`` highest scores among
    them. Exact ties go to the lowest block index (stable sort; spec §3.6 leaves ties undefined).
    """
    masked = _visible_scores(scores, n_visible)
    order = np.argsort(-masked, axis=1, kind="stable")[:, :min(top_k, scores.shape[1])]
    return np.where(order < n_visible[:, None], order, -1)


def indexer_topk_margins(scores: np.ndarray, n_visible: np.ndarray, top_k: int) -> np.ndarray:
    """Per row: ``(k-th − (k+1)-th score) / max |visible score|`` (§8); NaN where nothing is dropped."""
    gaps = np.full(len(scores), np.nan)
    rows = np.nonzero(n_visible > top_k)[0]
    if len(rows) == 0:
        return gaps
    masked = _visible_scores(scores[rows], n_visible[rows])
    ranked = -np.sort(-masked, axis=1)
    gap = ranked[:, top_k - 1] - ranked[:, top_k]
    scale = np.max(np.where(np.isfinite(masked), np.abs(masked), 0.0), axis=1)
    gaps[rows] = np.where(scale > 0, gap / np.where(scale > 0, scale, 1.0), 0.0)
    return gaps
