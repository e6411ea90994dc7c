"""The float64 reference forward pass of DeepSeek-V4 (spec §3) with incremental decode state (§4).

``Reference(path).eval(tokens)`` runs one batch of consecutive tokens, appending to the state;
any split of a sequence into eval() calls gives the same logits.
"""

from __future__ import annotations

import numpy as np

from ..errors import ContextOverflowError, InvalidArgumentError
from .attention import attention_layer
from .common import rms_norm
from .hc import hc_head, hc_post, hc_pre
from .moe import moe_layer
from .rope import layer_rope_freqs
from .state import LayerState
from .weights import load_model


class MarginLog:
    """Selection gaps recorded for the diagnostic hook (spec §8 "Selection margins")."""

    def __init__(self):
        self.records: list[tuple[str, int, int, float]] = []  # (kind, layer, position, gap)
        self.positions = np.zeros(0, dtype=np.int64)

    def add(self, kind: str, layer: int, gaps: np.ndarray) -> None:
        for pos, gap in zip(self.positions, gaps):
            if not np.isnan(gap):
                self.records.append((kind, layer, int(pos), float(gap)))

    def minimum(self, kind: str) -> float:
        gaps = [r[3] for r in self.records if r[0] == kind]
        return min(gaps) if gaps else float("inf")


def block(X: np.ndarray, tokens: np.ndarray, positions: np.ndarray, w: dict, hp: dict, il: int,
          state: LayerState, freqs: np.ndarray, margins: MarginLog | None = None) -> np.ndarray:
    """One transformer block (§3.3): HC-wrapped attention, then HC-wrapped MoE. ``X [T, HC, D]``."""
    iters, norm_eps, hc_eps = hp["hc_sinkhorn_iters"], hp["norm_eps"], hp["hc_eps"]

    y, post, comb = hc_pre(X, w["hc_attn_fn"], w["hc_attn_scale"], w["hc_attn_base"], iters, norm_eps, hc_eps)
    a = attention_layer(rms_norm(y, w["attn_norm"], norm_eps), positions, w, hp, state, freqs, margins, il)
    X = hc_post(a, X, post, comb)

    y, post, comb = hc_pre(X, w["hc_ffn_fn"], w["hc_ffn_scale"], w["hc_ffn_base"], iters, norm_eps, hc_eps)
    f = moe_layer(rms_norm(y, w["ffn_norm"], norm_eps), tokens, w, hp, il, margins)
    return hc_post(f, X, post, comb)


class Reference:
    """Float64 NumPy DeepSeek-V4 trunk read from a GGUF, with decode state (MTP head: ``reference.mtp``)."""

    def __init__(self, path, record_margins: bool = False):
        self.path = str(path)
        self._hp, self._globals, self._layers = load_model(path)
        self._freqs = [layer_rope_freqs(self._hp, r) for r in self._hp["compress_ratios"]]
        self._record_margins = record_margins
        self.reset()

    @property
    def hparams(self) -> dict:
        return dict(self._hp)

    @property
    def n_vocab(self) -> int:
        return self._hp["n_vocab"]

    @property
    def n_past(self) -> int:
        return self._n_past

    def reset(self) -> None:
        """Forget every token: empty windows, compressor states back to (0, −∞), empty caches."""
        self._n_past = 0
        self._states = [LayerState(self._hp, r) for r in self._hp["compress_ratios"]]
        self._margins = MarginLog() if self._record_margins else None

    def min_margins(self) -> dict:
        """Smallest recorded selection gaps: ``indexer`` = (k-th − (k+1)-th score) / max |visible score|
        of the row, over selections that drop blocks; ``router`` = K-th − (K+1)-th biased score
        (absolute), non-hash layers. ``inf`` where nothing was recorded. (Spec §8 quotes the indexer gap
        relative to |k-th score| instead, a larger number.)"""
        if self._margins is None:
            raise RuntimeError("construct Reference(path, record_margins=True) to record margins")
        return {"indexer": self._margins.minimum("indexer"), "router": self._margins.minimum("router")}

    def margin_records(self) -> list[tuple[str, int, int, float]]:
        """Every recorded gap as ``(kind, layer, position, gap)``."""
        if self._margins is None:
            raise RuntimeError("construct Reference(path, record_margins=True) to record margins")
        return list(self._margins.records)

    def _check_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise InvalidArgumentError(f"tokens must be a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size == 0:
            raise InvalidArgumentError("tokens is empty: eval() needs at least one token")
        if not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
            raise InvalidArgumentError(f"tokens must be integers, got dtype {arr.dtype}")
        bad = (arr < 0) | (arr >= self.n_vocab)
        if bad.any():
            raise InvalidArgumentError(f"token id {arr[bad][0]} out of range [0, {self.n_vocab})")
        if self._n_past + arr.size > self._hp["n_ctx_train"]:
            raise ContextOverflowError(f"{self._n_past} + {arr.size} tokens exceed the context length "
                             f"{self._hp['n_ctx_train']}")
        return arr.astype(np.int64)

    def eval(self, tokens, return_xfin: bool = False):
        """Logits ``[len(tokens), n_vocab]`` (float64) for the next tokens, processed as one batch.

        ``return_xfin``: return ``(logits, xfin)`` with ``xfin [len(tokens), HC, D]`` the final stream
        states (after the last block, before the HC head: the MTP head's input, §3.10).
        """
        tokens = self._check_tokens(tokens)
        hp, g = self._hp, self._globals
        positions = np.arange(self._n_past, self._n_past + len(tokens))
        if self._margins is not None:
            self._margins.positions = positions

        # §3.1: embedding copied into every stream
        X = np.repeat(g["token_embd"][tokens][:, None, :], hp["hc_mult"], axis=1)
        for il, w in enumerate(self._layers):
            X = block(X, tokens, positions, w, hp, il, self._states[il], self._freqs[il], self._margins)
        self._n_past += len(tokens)

        # §3.9: HC head, final norm, LM head
        y = hc_head(X, g["output_hc_fn"], g["output_hc_scale"], g["output_hc_base"], hp["norm_eps"], hp["hc_eps"])
        y = rms_norm(y, g["output_norm"], hp["norm_eps"])
        logits = y @ g["output"].T
        return (logits, X) if return_xfin else logits
