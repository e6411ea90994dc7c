"""KV compressor shared by CSA (ratio 4, overlapping halves), HCA (ratio 128) and the indexer (§3.5, §4.2).

Each token s contributes ``a_s = W_kv·x_s`` (values) and ``z_s = W_gate·x_s + ape[s mod r]`` (gate
logits; APE on the logits only). Block j (tokens ``[jr, jr+r−1]``) is pooled per channel with a
softmax over its members, RMS-normed and roped at position ``j·r``.
"""

from __future__ import annotations

import numpy as np

from .common import rms_norm, softmax
from .rope import rope


def compressor_project(x: np.ndarray, positions: np.ndarray, w_kv: np.ndarray, w_gate: np.ndarray,
                       ape: np.ndarray, ratio: int):
    """``(a [T, c·d], z [T, c·d])`` for tokens at absolute ``positions``; the APE row is ``pos mod r``."""
    a = x @ w_kv.T
    z = x @ w_gate.T + ape[positions % ratio]
    return a, z


def pool_block(values: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """``u[ch] = Σ_m softmax_m(logits[m, ch])·values[m, ch]``: softmax over members, per channel (§7 #19).

    ``values``/``logits``: ``[..., members, d]``. A member with logit −∞ gets weight exactly 0.
    """
    return np.sum(softmax(logits, axis=-2) * values, axis=-2)


def compress_block(values: np.ndarray, logits: np.ndarray, norm: np.ndarray, norm_eps: float,
                   block_ids: np.ndarray, ratio: int, freqs: np.ndarray) -> np.ndarray:
    """Compressed entries ``[nb, d]`` of blocks ``block_ids``: pool, RMSNorm(norm), rope at ``j·r`` (§3.5)."""
    u = pool_block(values, logits)
    c = rms_norm(u, norm, norm_eps)
    return rope(c, np.asarray(block_ids) * ratio, freqs)


class CompressorState:
    """Partial-block state of one compressor (spec §4.2, reference layout).

    Row ``i`` holds the ``(a, z)`` of position ``first_pos + i``. Overlap (ratio 4): ``2r`` rows,
    rows ``0 … r−1`` = previous block, ``r … 2r−1`` = current block. HCA: ``r`` rows = current
    block. Rows with no token yet hold value 0 / logit −∞, which is what gives block 0's
    previous half weight exactly 0 (§7 #29).
    """

    def __init__(self, ratio: int, dim: int):
        self.ratio = ratio
        self.dim = dim
        self.overlap = ratio == 4
        width = 2 * dim if self.overlap else dim
        n_rows = 2 * ratio if self.overlap else ratio
        self.kv = np.zeros((n_rows, width))
        self.score = np.full((n_rows, width), -np.inf)
        self.n_past = 0

    @property
    def first_pos(self) -> int:
        """Position held by row 0: start of the current block, minus one block with overlap."""
        r = self.ratio
        return (self.n_past // r) * r - (r if self.overlap else 0)

    def append(self, a: np.ndarray, z: np.ndarray):
        """Add the next ``T`` tokens' ``(a, z)``; return the blocks they complete.

        Returns ``(block_ids [nb], values [nb, members, d], logits [nb, members, d])``, members
        ordered previous half (features ``[0:d]``) then current half (``[d:2d]``) for overlap (§7 #18).
        """
        r, d = self.ratio, self.dim
        p0, start = self.n_past, self.first_pos
        end = p0 + len(a)
        kv = np.concatenate([self.kv[:p0 - start], a])
        score = np.concatenate([self.score[:p0 - start], z])

        block_ids = np.arange(p0 // r, end // r)
        cur = (block_ids * r - start)[:, None] + np.arange(r)[None, :]
        if self.overlap:
            prev = cur - r
            values = np.concatenate([kv[prev][..., :d], kv[cur][..., d:]], axis=1)
            logits = np.concatenate([score[prev][..., :d], score[cur][..., d:]], axis=1)
        else:
            values, logits = kv[cur], score[cur]

        self.n_past = end
        keep = slice(self.first_pos - start, end - start)
        n_keep = keep.stop - keep.start
        self.kv.fill(0.0)
        self.score.fill(-np.inf)
        self.kv[:n_keep] = kv[keep]
        self.score[:n_keep] = score[keep]
        return block_ids, values, logits


def compress_kv(x: np.ndarray, positions: np.ndarray, w: dict, prefix: str, state: CompressorState,
                cache, norm_eps: float, freqs: np.ndarray) -> None:
    """Run one compressor over a batch: update its state, write every completed block to ``cache``.

    ``prefix`` selects the tensors: ``attn_compressor`` (main, d = head_dim) or
    ``indexer_compressor`` (d = indexer head dim).
    """
    a, z = compressor_project(x, positions, w[f"{prefix}_kv"], w[f"{prefix}_gate"],
                              w[f"{prefix}_ape"], state.ratio)
    block_ids, values, logits = state.append(a, z)
    if len(block_ids):
        assert block_ids[0] == len(cache), "compressed entries are written once, in block order"
        cache.append(compress_block(values, logits, w[f"{prefix}_norm"], norm_eps, block_ids,
                                    state.ratio, freqs))
