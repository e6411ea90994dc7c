"""Mixture of experts: sqrt-softplus router, hash or biased top-k selection, clamped SwiGLU experts (§3.8)."""

from __future__ import annotations

import numpy as np

from .common import silu


def router_scores(x: np.ndarray, w_router: np.ndarray) -> np.ndarray:
    """``p = sqrt(softplus(W_router·x))`` with a stable softplus; ``[T, n_expert]``, not normalised."""
    return np.sqrt(np.logaddexp(0.0, x @ w_router.T))


def route(scores: np.ndarray, n_used: int, bias: np.ndarray | None = None,
          hash_experts: np.ndarray | None = None, weights_scale: float = 1.0,
          weights_norm: bool = True):
    """Pick experts and their weights. Returns ``(selected [T, K] ids, weights [T, K])``.

    Selection: ``hash_experts`` (the tid2eid rows of the tokens) if given, else the top-``n_used``
    of ``scores + bias`` (exact ties to the lowest id). The bias only selects (§7 #13): weights
    are the unbiased scores gathered at the selection, renormalised over it, times ``weights_scale``.
    """
    if hash_experts is not None:
        selected = np.asarray(hash_experts, dtype=np.int64)
    else:
        biased = scores if bias is None else scores + bias
        selected = np.argsort(-biased, axis=1, kind="stable")[:, :n_used]
    weights = np.take_along_axis(scores, selected, axis=1)
    if weights_norm:
        weights = weights / np.sum(weights, axis=1, keepdims=True)
    return selected, weights * weights_scale


def router_margins(scores: np.ndarray, bias: np.ndarray | None, n_used: int) -> np.ndarray:
    """Per token: K-th minus (K+1)-th biased score (absolute), the distance to a different selection."""
    biased = scores if bias is None else scores + bias
    ranked = -np.sort(-biased, axis=1)
    if ranked.shape[1] <= n_used:
        return np.full(len(ranked), np.inf)
    return ranked[:, n_used - 1] - ranked[:, n_used]


def swiglu_clamp(gate: np.ndarray, up: np.ndarray, limit: float) -> np.ndarray:
    """``silu(min(gate, L)) ⊙ clamp(up, −L, L)``: gate clamped from above only, before SiLU (§7 #11)."""
    return silu(np.minimum(gate, limit)) * np.clip(up, -limit, limit)


def expert_ffn(x: np.ndarray, w_gate: np.ndarray, w_up: np.ndarray, w_down: np.ndarray,
               limit: float) -> np.ndarray:
    """One expert: ``W2 · swiglu_clamp(W1·x, W3·x)`` (w1 = ffn_gate, w3 = ffn_up, w2 = ffn_down)."""
    return swiglu_clamp(x @ w_gate.T, x @ w_up.T, limit) @ w_down.T


def routed_experts(x: np.ndarray, selected: np.ndarray, weights: np.ndarray, w_gate: np.ndarray,
                   w_up: np.ndarray, w_down: np.ndarray, limit: float) -> np.ndarray:
    """``Σ_{e ∈ S_t} g_{t,e}·h_e(x_t)``; expert tensors are ``[E, out, in]``. Batched per expert."""
    out = np.zeros_like(x)
    for e in np.unique(selected):
        tok, slot = np.nonzero(selected == e)
        h = expert_ffn(x[tok], w_gate[e], w_up[e], w_down[e], limit)
        np.add.at(out, tok, weights[tok, slot][:, None] * h)
    return out


def moe_layer(x: np.ndarray, tokens: np.ndarray, w: dict, hp: dict, il: int, margins=None):
    """The FFN of layer ``il``: routed experts plus the shared expert (same clamp formula, weight 1).

    ``margins``: optional log with ``add(kind, layer, gaps)`` receiving the router selection gaps.
    """
    scores = router_scores(x, w["ffn_gate_inp"])
    if il < hp["n_hash_layers"]:
        # hash routing: experts looked up by the input token id; weights still from the router (§7 #14)
        selected, weights = route(scores, hp["n_expert_used"], hash_experts=w["ffn_gate_tid2eid"][tokens],
                                  weights_scale=hp["expert_weights_scale"],
                                  weights_norm=hp["expert_weights_norm"])
    else:
        selected, weights = route(scores, hp["n_expert_used"], bias=w["exp_probs_b"],
                                  weights_scale=hp["expert_weights_scale"],
                                  weights_norm=hp["expert_weights_norm"])
        if margins is not None:
            margins.add("router", il, router_margins(scores, w["exp_probs_b"], hp["n_expert_used"]))
    out = routed_experts(x, selected, weights, w["ffn_gate_exps"], w["ffn_up_exps"], w["ffn_down_exps"],
                         hp["swiglu_clamp_exp"][il])
    if hp["n_expert_shared"] > 0:
        out = out + expert_ffn(x, w["ffn_gate_shexp"], w["ffn_up_shexp"], w["ffn_down_shexp"],
                               hp["swiglu_clamp_shexp"][il])
    return out
