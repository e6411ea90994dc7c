"""Rotary embeddings: interleaved pairs on the tail of each head, plain or YaRN frequencies (§1.3, §3.4.3)."""

from __future__ import annotations

import math

import numpy as np


def rope_freqs(n_rot: int, base: float) -> np.ndarray:
    """Plain frequencies ``f_i = base^(−2i/n_rot)``, pair i = 0 … n_rot/2 − 1 (ratio-0 layers)."""
    i = np.arange(n_rot // 2, dtype=np.float64)
    return base ** (-2.0 * i / n_rot)


def yarn_corr_dims(n_rot: int, base: float, orig_ctx: int, beta_fast: float = 32.0,
                   beta_slow: float = 1.0) -> tuple[int, int]:
    """YaRN correction range ``(low, high)`` in pair units, as ggml computes it (§1.3 general form)."""

    def corr(beta):
        return n_rot * math.log(orig_ctx / (2.0 * math.pi * beta)) / (2.0 * math.log(base))

    low = max(0, math.floor(corr(beta_fast)))
    high = min(n_rot - 1, math.ceil(corr(beta_slow)))
    return low, high


def yarn_freqs(n_rot: int, base: float, factor: float, orig_ctx: int, beta_fast: float = 32.0,
               beta_slow: float = 1.0) -> np.ndarray:
    """YaRN frequencies without any magnitude (mscale) factor (§1.3, §7 #4).

    ``f'_i = f_i·(1 − ramp_i) + (f_i/factor)·ramp_i`` with
    ``ramp_i = clamp((i − low)/max(0.001, high − low), 0, 1)``.
    """
    low, high = yarn_corr_dims(n_rot, base, orig_ctx, beta_fast, beta_slow)
    f = rope_freqs(n_rot, base)
    i = np.arange(n_rot // 2, dtype=np.float64)
    ramp = np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)
    return f * (1.0 - ramp) + (f / factor) * ramp


def layer_rope_freqs(hp: dict, ratio: int) -> np.ndarray:
    """Per-layer choice by ``compress_ratios[il] != 0``, never by layer index (§7 #3)."""
    if ratio == 0:
        return rope_freqs(hp["n_rot"], hp["rope_freq_base"])
    return yarn_freqs(hp["n_rot"], hp["compress_rope_freq_base"], hp["rope_scaling_factor"],
                      hp["rope_orig_ctx"], hp["yarn_beta_fast"], hp["yarn_beta_slow"])


def rope(x: np.ndarray, positions: np.ndarray, freqs: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Rotate the last ``2·len(freqs)`` dims of ``x [T, ..., d]`` as interleaved pairs (ggml mode 0).

    Pair i = ``(x[d−n+2i], x[d−n+2i+1])`` at angle ``positions[t]·freqs[i]`` (``inverse``: the
    negated angle). The leading ``d − n`` (nope) dims are returned bit-for-bit unchanged.
    """
    n = 2 * len(freqs)
    d = x.shape[-1]
    positions = np.asarray(positions, dtype=np.float64)
    angle = positions[:, None] * freqs[None, :]
    angle = angle.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (len(freqs),))
    cos, sin = np.cos(angle), np.sin(angle)
    if inverse:
        sin = -sin
    x0 = x[..., d - n::2]
    x1 = x[..., d - n + 1::2]
    out = x.copy()
    out[..., d - n::2] = x0 * cos - x1 * sin
    out[..., d - n + 1::2] = x0 * sin + x1 * cos
    return out
