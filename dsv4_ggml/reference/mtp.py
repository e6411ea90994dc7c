"""The MTP (next-next-token) block of DeepSeek-V4 in float64 (spec §3.10, §2.1 "MTP block", §4.1, §7 #22/#30).

Inputs of the MTP row at position ``q``: the trunk's final stream state of the previous position
``Xfin[q−1] ∈ R^{HC×D}`` (after the last block, before the HC head) and the token ``tok[q]``; the
row at ``q = 0`` uses an all-zero state (llama.cpp's convention, §3.10). Per row:

1. ``e = RMSNorm(Embed[tok[q]]; enorm)``, ``ĥ[k] = RMSNorm(Xfin[q−1][k]; hnorm)`` per stream;
2. ``X[k] = eh_proj · concat(e, ĥ[k])`` (e first), no residual from ``Xfin``;
3. one standard block at layer index ``n_layer`` (ratio 0: sliding window only, over the MTP
   block's own window of earlier MTP rows; base rope; never hash-routed), at position ``q``;
4. ``logits = W_out · RMSNorm(HChead(X); shared_head_norm)``, which predict ``tok[q+2]``.

Tensors: ``blk.{n_layer}.*`` (the standard per-layer set for ratio 0, plus ``exp_probs_b``),
``blk.{n_layer}.nextn.eh_proj / enorm / hnorm`` (required), ``nextn.shared_head_norm`` (falls back to
``output_norm``), ``nextn.embed_tokens`` / ``nextn.shared_head_head`` (fall back to ``token_embd`` /
``output``), and the root ``output_hc_fn / _base / _scale`` as the MTP's HC head (what llama.cpp reads;
in llama.cpp's separate MTP GGUF those root tensors are the MTP head's own ``mtp.0.hc_head_*``, in a
merged trunk + MTP file they are the trunk's, §7 #22).

``mtp_logits`` evaluates a whole sequence at once; ``MtpState`` is the same computation fed
in pieces (one row at a time or in chunks), with the MTP block's own window ring (§4.1).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import numpy as np

from ..errors import BadKeyError, InvalidArgumentError, MissingTensorError, TensorShapeError
from .common import rms_norm
from .hc import hc_head
from .model import block
from .rope import layer_rope_freqs
from .state import LayerState
from .weights import ARCH, _check_layer, _per_layer_floats, _read_field, _strip_suffix, _tensor_to_f64, read_hparams


@dataclass
class MtpWeights:
    """Everything the MTP head reads, float64, NumPy row-major (a linear layer is ``[out, in]``).

    ``hp`` holds the trunk's hparams with ``compress_ratios`` / ``swiglu_clamp_*`` extended by the MTP
    block's entry (index ``n_layer``), so :func:`~.model.block` can run it as layer ``n_layer``.
    ``layer`` is the ``blk.{n_layer}.*`` dict (names without the prefix, incl. ``nextn.*``).
    """

    hp: dict
    layer: dict
    embed: np.ndarray        # [n_vocab, D]: nextn.embed_tokens, else token_embd
    head: np.ndarray         # [n_vocab, D]: nextn.shared_head_head, else output
    head_norm: np.ndarray    # [D]: nextn.shared_head_norm, else output_norm
    hc_head_fn: np.ndarray   # [HC, HC·D]: root output_hc_fn
    hc_head_base: np.ndarray  # [HC]
    hc_head_scale: np.ndarray  # [1]
    freqs: np.ndarray        # rope frequencies of a ratio-0 layer (base rope_freq_base, no YaRN)

    @property
    def il(self) -> int:
        """The MTP block's layer index (= number of trunk layers)."""
        return self.hp["n_layer"]

    @property
    def n_vocab(self) -> int:
        return self.hp["n_vocab"]


def load_mtp(path) -> MtpWeights:
    """Read the MTP block of a DS4 GGUF (merged trunk + MTP, or llama.cpp's MTP-only file).

    Raises :class:`MissingTensorError` when the file has no MTP block (``nextn_predict_layers`` absent
    or 0, or its tensors missing), :class:`BadKeyError` for an MTP schedule the spec excludes.
    """
    import gguf

    reader = gguf.GGUFReader(os.fspath(path))
    hp = read_hparams(reader)  # hp["n_layer"] = block_count − nextn_predict_layers (trunk layers)
    n_nextn = int(_read_field(reader, f"{ARCH}.nextn_predict_layers", 0, required=False))
    n_layer = hp["n_layer"]
    if n_nextn == 0:
        raise MissingTensorError(f"{os.fspath(path)} has no MTP block ({ARCH}.nextn_predict_layers is absent "
                                 f"or 0): the MTP head needs the blk.{n_layer}.nextn.* tensors")
    if n_nextn != 1:
        raise BadKeyError(f"{ARCH}.nextn_predict_layers is {n_nextn}; DeepSeek-V4 has exactly 1 MTP block")
    if hp["n_hash_layers"] > n_layer:
        raise BadKeyError(f"hash_layer_count {hp['n_hash_layers']} would hash-route the MTP block "
                          f"blk.{n_layer}; it never is (§2.1)")

    block_count = n_layer + 1
    ratios = [int(r) for r in _read_field(reader, f"{ARCH}.attention.compress_ratios")]
    if len(ratios) < block_count:
        raise BadKeyError(f"{ARCH}.attention.compress_ratios has {len(ratios)} entries, fewer than "
                          f"block_count = {block_count} (entry {n_layer} is the MTP block)")
    if ratios[n_layer] != 0:
        raise BadKeyError(f"{ARCH}.attention.compress_ratios[{n_layer}] (the MTP block) is "
                          f"{ratios[n_layer]}; it must be 0")
    clamp_exp = _per_layer_floats(reader, f"{ARCH}.swiglu_clamp_exp", block_count)
    clamp_shexp = _per_layer_floats(reader, f"{ARCH}.swiglu_clamp_shexp", block_count, fallback=clamp_exp)
    hp = dict(hp, compress_ratios=list(hp["compress_ratios"]) + [0],
              swiglu_clamp_exp=list(hp["swiglu_clamp_exp"]) + [clamp_exp[n_layer]],
              swiglu_clamp_shexp=list(hp["swiglu_clamp_shexp"]) + [clamp_shexp[n_layer]])

    prefix = f"blk.{n_layer}."
    globals_: dict[str, np.ndarray] = {}
    layer: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _strip_suffix(tensor.name)
        if name.startswith(prefix):
            layer[name[len(prefix):]] = _tensor_to_f64(tensor)
        elif not name.startswith("blk."):
            globals_[name] = _tensor_to_f64(tensor)

    for name in ("nextn.eh_proj", "nextn.enorm", "nextn.hnorm"):
        if name not in layer:
            raise MissingTensorError(f"GGUF tensor '{prefix}{name}.weight' (MTP block) is missing")
    for name in ("token_embd", "output_norm", "output", "output_hc_fn", "output_hc_base", "output_hc_scale"):
        if name not in globals_:
            raise MissingTensorError(f"GGUF tensor '{name}.weight' is missing")
    if hp["n_vocab"] is None:
        hp["n_vocab"] = globals_["token_embd"].shape[0]
    _check_layer(hp, n_layer, layer)  # the standard per-layer set for ratio 0, not hash-routed

    D, HC, V = hp["n_embd"], hp["hc_mult"], hp["n_vocab"]
    expected = {"nextn.eh_proj": (D, 2 * D), "nextn.enorm": (D,), "nextn.hnorm": (D,),
                "nextn.shared_head_norm": (D,), "nextn.embed_tokens": (V, D), "nextn.shared_head_head": (V, D)}
    for name, shape in expected.items():
        if name in layer and layer[name].shape != shape:
            raise TensorShapeError(f"{prefix}{name} has shape {layer[name].shape}, expected {shape}")
    for name, shape in {"token_embd": (V, D), "output": (V, D), "output_norm": (D,),
                        "output_hc_fn": (HC, HC * D), "output_hc_base": (HC,), "output_hc_scale": (1,)}.items():
        if globals_[name].shape != shape:
            raise TensorShapeError(f"{name} has shape {globals_[name].shape}, expected {shape}")
    # attn_output_a ne{H*Dh/G, G*R}: G stacked matrices [R, H*Dh/G], group slowest (§7 #23)
    layer["attn_output_a"] = layer["attn_output_a"].reshape(
        hp["o_groups"], hp["o_lora_rank"], hp["n_head"] * hp["head_dim"] // hp["o_groups"])

    return MtpWeights(
        hp=hp, layer=layer,
        embed=layer.get("nextn.embed_tokens", globals_["token_embd"]),
        head=layer.get("nextn.shared_head_head", globals_["output"]),
        head_norm=layer.get("nextn.shared_head_norm", globals_["output_norm"]),
        hc_head_fn=globals_["output_hc_fn"], hc_head_base=globals_["output_hc_base"],
        hc_head_scale=globals_["output_hc_scale"],
        freqs=layer_rope_freqs(hp, 0))


def _as_weights(weights) -> MtpWeights:
    return weights if isinstance(weights, MtpWeights) else load_mtp(weights)


def _check_rows(mw: MtpWeights, tokens, states, name: str):
    """tokens ``[T]`` int, states ``[T, HC, D]`` (or the flat ``[T, HC·D]`` h_nextn layout, stream 0 first)."""
    hp = mw.hp
    HC, D = hp["hc_mult"], hp["n_embd"]
    tok = np.asarray(tokens)
    if tok.ndim != 1 or tok.size == 0:
        raise InvalidArgumentError(f"tokens must be a non-empty 1-D sequence, got shape {tok.shape}")
    if not (np.issubdtype(tok.dtype, np.integer) and tok.dtype != np.bool_):
        raise InvalidArgumentError(f"tokens must be integers, got dtype {tok.dtype}")
    bad = (tok < 0) | (tok >= hp["n_vocab"])
    if bad.any():
        raise InvalidArgumentError(f"token id {tok[bad][0]} out of range [0, {hp['n_vocab']})")
    X = np.asarray(states, dtype=np.float64)
    if X.ndim == 2 and X.shape[1] == HC * D:
        X = X.reshape(len(X), HC, D)
    if X.shape != (tok.size, HC, D):
        raise InvalidArgumentError(f"{name} must have shape (T={tok.size}, {HC}, {D}) or (T, {HC * D}), "
                                   f"got {np.shape(states)}")
    return tok.astype(np.int64), X


def mtp_input(mw: MtpWeights, tokens: np.ndarray, h_prev: np.ndarray) -> np.ndarray:
    """Steps 1–2 of §3.10: the MTP block's input state ``[T, HC, D]`` from the tokens ``u`` and the
    previous positions' trunk states ``h_prev [T, HC, D]`` (zeros for position 0).

    ``eh_proj [D, 2D]``: input columns ``0..D−1`` act on ``e``, ``D..2D−1`` on ``ĥ[k]``.
    """
    eps, D = mw.hp["norm_eps"], mw.hp["n_embd"]
    w = mw.layer
    e = rms_norm(mw.embed[tokens], w["nextn.enorm"], eps)       # [T, D], the same for every stream
    h = rms_norm(h_prev, w["nextn.hnorm"], eps)                  # [T, HC, D], each stream over its own D
    eh = w["nextn.eh_proj"]
    return (e @ eh[:, :D].T)[:, None, :] + h @ eh[:, D:].T


def mtp_head(mw: MtpWeights, X: np.ndarray) -> np.ndarray:
    """Step 4 of §3.10: ``W_out · RMSNorm(HChead(X); shared_head_norm)`` -> logits ``[T, n_vocab]``."""
    hp = mw.hp
    y = hc_head(X, mw.hc_head_fn, mw.hc_head_scale, mw.hc_head_base, hp["norm_eps"], hp["hc_eps"])
    return rms_norm(y, mw.head_norm, hp["norm_eps"]) @ mw.head.T


class MtpState:
    """The MTP head with its decode state: the MTP block's own sliding-window ring (ratio 0, §4.1) and
    the trunk state waiting to be paired with the next token.

    ``eval(tokens, xfin)`` takes the trunk's tokens and their final stream states in order (any split
    into calls); row ``q`` is ``(Xfin[q−1], tok[q])`` at position ``q``, ``Xfin[−1] = 0``.
    ``eval_rows(tokens, h_prev)`` takes explicit rows (e.g. to draft from the MTP's own output state).
    """

    def __init__(self, weights):
        self.weights = _as_weights(weights)
        self.reset()

    @property
    def n_past(self) -> int:
        """Number of MTP rows processed (= position of the next row)."""
        return self._n_past

    @property
    def pending(self) -> np.ndarray:
        """The state ``[HC, D]`` that ``eval`` pairs with the next token (zeros before the first row)."""
        return self._pending.copy()

    def reset(self) -> None:
        hp = self.weights.hp
        self._n_past = 0
        self._layer_state = LayerState(hp, 0)
        self._pending = np.zeros((hp["hc_mult"], hp["n_embd"]))

    def copy(self) -> "MtpState":
        """An independent copy (for rollback: keep one before a speculative step)."""
        other = copy.copy(self)
        other._layer_state = copy.deepcopy(self._layer_state)
        other._pending = self._pending.copy()
        return other

    def eval_rows(self, tokens, h_prev, return_state: bool = False):
        """MTP rows ``(h_prev[i], tokens[i])`` at positions ``n_past + i``; logits ``[T, n_vocab]``.

        ``return_state``: also return the block's output state ``[T, HC, D]`` (before the HC head).
        Does not touch ``pending``.
        """
        mw = self.weights
        tok, h = _check_rows(mw, tokens, h_prev, "h_prev")
        if self._n_past + len(tok) > mw.hp["n_ctx_train"]:
            raise InvalidArgumentError(f"{self._n_past} + {len(tok)} MTP rows exceed the context length "
                                       f"{mw.hp['n_ctx_train']}")
        positions = np.arange(self._n_past, self._n_past + len(tok))
        X = mtp_input(mw, tok, h)
        X = block(X, tok, positions, mw.layer, mw.hp, mw.il, self._layer_state, mw.freqs)
        self._n_past += len(tok)
        logits = mtp_head(mw, X)
        return (logits, X) if return_state else logits

    def eval(self, tokens, xfin, return_state: bool = False):
        """The next tokens of the sequence with the trunk's final states for the same positions.

        Row for ``tokens[i]`` pairs it with the trunk state of the position before (the last ``xfin`` of
        the previous call, or zeros at position 0); ``xfin[-1]`` becomes ``pending``. Logits row ``i``
        predicts the token two positions after ``tokens[i]``.
        """
        tok, X = _check_rows(self.weights, tokens, xfin, "xfin")
        h_prev = np.concatenate([self._pending[None], X[:-1]])
        out = self.eval_rows(tok, h_prev, return_state)
        self._pending = X[-1].copy()
        return out


def mtp_logits(weights, tokens, xfin, return_state: bool = False):
    """MTP logits ``[T, n_vocab]`` of a whole sequence from position 0, in one batch.

    ``weights``: an :class:`MtpWeights` or a GGUF path; ``tokens [T]``; ``xfin [T, HC, D]`` (or
    ``[T, HC·D]``): the trunk's final stream states of the same positions (``Reference.eval(...,
    return_xfin=True)``). Row ``q`` = ``(xfin[q−1], tokens[q])`` with a zero state at ``q = 0``;
    logits row ``q`` predicts ``tokens[q+2]``. ``return_state`` also returns the MTP block's output.
    """
    return MtpState(weights).eval(tokens, xfin, return_state)
