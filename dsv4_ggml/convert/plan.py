"""The tensor plan: every GGUF tensor (name, shape, ggml type) with the generator of its bytes, from
the checkpoint tensors and the hyperparameters; the leftovers (skipped on purpose, unexpected)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from gguf import GGMLQuantizationType

from ..errors import (InvalidArgumentError, MissingTensorError, ModelFormatError, TensorShapeError,
                      TensorTypeError)
from .checkpoint import _INT_DTYPES, Checkpoint, _row_blocks, _Source
from .encode import _GTYPE, T, _encode, _fit, _nbytes


@dataclass
class _Item:
    name: str                                   # GGUF tensor name
    shape: tuple[int, ...]                      # NumPy order (ggml ne reversed)
    gtype: GGMLQuantizationType
    produce: Callable[[], Iterator[np.ndarray]]
    nbytes: int = 0


@dataclass
class _Planner:
    ck: Checkpoint
    hp: dict[str, Any]
    outtype: str
    experts: str
    mtp: bool
    consumed: set[str] = field(default_factory=set)
    dropped: list[str] = field(default_factory=list)
    items: list[_Item] = field(default_factory=list)

    # --- output types
    def _w_type(self, row_len: int, name: str | None = None) -> GGMLQuantizationType:
        return _fit(_GTYPE[name or self.outtype], row_len)

    def _hp_type(self, src: _Source) -> GGMLQuantizationType:
        if self.outtype in ("f32", "f16"):
            return _GTYPE[self.outtype]
        return T.BF16 if src.dtype == "BF16" else T.F16

    # --- helpers
    def _check_shape(self, src: _Source, want: tuple[int, ...]) -> None:
        if tuple(src.shape) != tuple(want):
            raise TensorShapeError(f"checkpoint tensor '{src.name}' has shape {list(src.shape)}, expected {list(want)} "
                                   "from config.json")

    def _find(self, name: str) -> str | None:
        for n in (name, name + ".weight", name[: -len(".weight")] if name.endswith(".weight") else None):
            if n is not None and n in self.ck:
                return n
        return None

    def _source(self, name: str, want: tuple[int, ...], optional: bool = False) -> _Source | None:
        found = self._find(name)
        if found is None:
            if optional:
                return None
            raise MissingTensorError(f"checkpoint tensor '{name}' is missing (needed for the GGUF with this config)")
        src = _Source(self.ck, found, self.consumed)
        self._check_shape(src, want)
        return src

    def _add(self, name: str, shape: tuple[int, ...], gtype: GGMLQuantizationType, produce) -> None:
        self.items.append(_Item(name, tuple(shape), gtype, produce, _nbytes(tuple(shape), gtype)))

    # --- kinds
    def float_tensor(self, gname: str, sname: str, want: tuple[int, ...], kind: str, optional: bool = False) -> None:
        """kind: 'w' (outtype), 'hp' (compressor / indexer.proj), 'f32'."""
        src = self._source(sname, want, optional)
        if src is None:
            return
        if kind == "f32":
            gtype = T.F32
        elif kind == "hp":
            gtype = self._hp_type(src)
        else:
            gtype = self._w_type(want[-1])

        def produce(src=src, gtype=gtype, gname=gname):
            if len(src.shape) <= 1:
                yield _encode(src.read(0, 1), gtype, gname).reshape(-1)
                return
            for r0, r1 in _row_blocks(src.rows, src.row_len):
                yield _encode(src.read(r0, r1), gtype, gname)
        self._add(gname, want, gtype, produce)

    def tid2eid(self, gname: str, sname: str, want: tuple[int, ...]) -> None:
        found = self._find(sname)
        if found is None:
            raise MissingTensorError(f"checkpoint tensor '{sname}' is missing (hash-routed layer)")
        ent = self.ck.entry(found)
        self.consumed.add(found)
        if ent.dtype not in _INT_DTYPES:
            raise TensorTypeError(f"checkpoint tensor '{found}' has dtype {ent.dtype}; expected an integer table")
        if tuple(ent.shape) != tuple(want):
            raise TensorShapeError(f"checkpoint tensor '{found}' has shape {list(ent.shape)}, expected {list(want)}")
        n_expert = self.hp["n_expert"]

        def produce(found=found):
            table = self.ck.read(found)
            if table.size and (table.min() < 0 or table.max() >= n_expert):
                raise ModelFormatError(f"'{found}' holds expert ids outside [0, {n_expert})")
            yield table.astype(np.int32)
        self._add(gname, want, T.I32, produce)

    def experts_tensor(self, gname: str, prefix: str, proj: str, want: tuple[int, ...]) -> None:
        """Routed experts `{prefix}ffn.experts.{e}.{proj}` stacked in id order: NumPy [E, out, in]."""
        n_expert, (out, n_in) = want[0], want[1:]
        srcs = [self._source(f"{prefix}ffn.experts.{e}.{proj}.weight", (out, n_in)) for e in range(n_expert)]
        all_fp4 = all(s.fmt == "fp4" for s in srcs)
        if self.experts == "mxfp4" or (self.experts == "auto" and all_fp4 and self.outtype != "f32"):
            if not all_fp4:
                bad = next(s for s in srcs if s.fmt != "fp4")
                raise InvalidArgumentError(f"experts='mxfp4' needs FP4 routed experts; '{bad.name}' is {bad.dtype}")
            gtype = T.MXFP4
        else:
            gtype = self._w_type(n_in, None if self.experts == "auto" else self.experts)

        def produce(srcs=srcs, gtype=gtype, gname=gname):
            for src in srcs:     # one expert at a time, in id order (E is the slowest axis)
                for r0, r1 in _row_blocks(src.rows, src.row_len):
                    if gtype == T.MXFP4:
                        yield src.read_mxfp4(r0, r1)
                    else:
                        yield _encode(src.read(r0, r1), gtype, gname)
        self._add(gname, want, gtype, produce)

    def eh_proj(self, gname: str, prefix: str) -> None:
        D = self.hp["n_embd"]
        e = self._source(f"{prefix}e_proj.weight", (D, D))
        h = self._source(f"{prefix}h_proj.weight", (D, D))
        gtype = self._w_type(2 * D)

        def produce(e=e, h=h, gtype=gtype):
            for r0, r1 in _row_blocks(D, 2 * D):
                yield _encode(np.concatenate([e.read(r0, r1), h.read(r0, r1)], axis=1), gtype, gname)
        self._add(gname, (D, 2 * D), gtype, produce)

    # --- the model
    def plan(self) -> None:
        hp = self.hp
        V, D, HC = hp["n_vocab"], hp["n_embd"], hp["hc_mult"]
        self.float_tensor("token_embd.weight", "embed.weight", (V, D), "w")
        self.float_tensor("output_norm.weight", "norm.weight", (D,), "f32")
        self.float_tensor("output.weight", "head.weight", (V, D), "w")
        self.float_tensor("output_hc_fn.weight", "hc_head_fn", (HC, HC * D), "f32")
        self.float_tensor("output_hc_base.weight", "hc_head_base", (HC,), "f32")
        self.float_tensor("output_hc_scale.weight", "hc_head_scale", (1,), "f32")
        for il in range(hp["n_layer"]):
            self.layer(il, f"layers.{il}.", hp["compress_ratios"][il], il < hp["n_hash_layers"], mtp=False)
        if self.mtp:
            self.layer(hp["n_layer"], "mtp.0.", 0, False, mtp=True)

    def layer(self, il: int, p: str, ratio: int, hashed: bool, mtp: bool) -> None:
        hp = self.hp
        D, H, Dh, HC = hp["n_embd"], hp["n_head"], hp["head_dim"], hp["hc_mult"]
        QL, G, R = hp["q_lora_rank"], hp["o_groups"], hp["o_lora_rank"]
        E, K, F = hp["n_expert"], hp["n_expert_used"], hp["expert_ff"] * hp["n_expert_shared"]
        mix = (2 + HC) * HC
        b = f"blk.{il}."
        ft = self.float_tensor
        if mtp:
            self.eh_proj(b + "nextn.eh_proj.weight", p)
            ft(b + "nextn.enorm.weight", p + "enorm.weight", (D,), "f32")
            ft(b + "nextn.hnorm.weight", p + "hnorm.weight", (D,), "f32")
            ft(b + "nextn.shared_head_norm.weight", p + "norm.weight", (D,), "f32")
        ft(b + "attn_norm.weight", p + "attn_norm.weight", (D,), "f32")
        ft(b + "attn_sinks.weight", p + "attn.attn_sink", (H,), "f32")
        ft(b + "attn_q_a.weight", p + "attn.wq_a.weight", (QL, D), "w")
        ft(b + "attn_q_a_norm.weight", p + "attn.q_norm.weight", (QL,), "f32")
        ft(b + "attn_q_b.weight", p + "attn.wq_b.weight", (H * Dh, QL), "w")
        ft(b + "attn_kv.weight", p + "attn.wkv.weight", (Dh, D), "w")
        ft(b + "attn_kv_a_norm.weight", p + "attn.kv_norm.weight", (Dh,), "f32")
        ft(b + "attn_output_a.weight", p + "attn.wo_a.weight", (G * R, H * Dh // G), "w")
        ft(b + "attn_output_b.weight", p + "attn.wo_b.weight", (D, G * R), "w")
        for site in ("attn", "ffn"):
            ft(b + f"hc_{site}_fn.weight", p + f"hc_{site}_fn", (mix, HC * D), "f32")
            ft(b + f"hc_{site}_base.weight", p + f"hc_{site}_base", (mix,), "f32")
            ft(b + f"hc_{site}_scale.weight", p + f"hc_{site}_scale", (3,), "f32")
        if ratio:
            c = 2 if ratio == 4 else 1
            ft(b + "attn_compressor_kv.weight", p + "attn.compressor.wkv.weight", (c * Dh, D), "hp")
            ft(b + "attn_compressor_gate.weight", p + "attn.compressor.wgate.weight", (c * Dh, D), "hp")
            ft(b + "attn_compressor_ape.weight", p + "attn.compressor.ape", (ratio, c * Dh), "f32")
            ft(b + "attn_compressor_norm.weight", p + "attn.compressor.norm.weight", (Dh,), "f32")
        if ratio == 4:
            HI, DI = hp["indexer_n_head"], hp["indexer_head_dim"]
            ft(b + "indexer.proj.weight", p + "attn.indexer.weights_proj.weight", (HI, D), "hp")
            ft(b + "indexer.attn_q_b.weight", p + "attn.indexer.wq_b.weight", (HI * DI, QL), "w")
            ft(b + "indexer_compressor_kv.weight", p + "attn.indexer.compressor.wkv.weight", (2 * DI, D), "hp")
            ft(b + "indexer_compressor_gate.weight", p + "attn.indexer.compressor.wgate.weight", (2 * DI, D), "hp")
            ft(b + "indexer_compressor_ape.weight", p + "attn.indexer.compressor.ape", (ratio, 2 * DI), "f32")
            ft(b + "indexer_compressor_norm.weight", p + "attn.indexer.compressor.norm.weight", (DI,), "f32")
        ft(b + "ffn_gate_inp.weight", p + "ffn.gate.weight", (E, D), "f32")
        if hashed:
            self.tid2eid(b + "ffn_gate_tid2eid.weight", p + "ffn.gate.tid2eid", (hp["n_vocab"], K))
            if self._find(p + "ffn.gate.bias"):   # unused on hash layers (llama.cpp drops it too)
                self.dropped.append(self._find(p + "ffn.gate.bias"))
        else:
            ft(b + "exp_probs_b.bias", p + "ffn.gate.bias", (E,), "f32")
        ft(b + "exp_probs_b_vl.bias", p + "ffn.gate.bias_vl", (E,), "f32", optional=True)
        ft(b + "ffn_norm.weight", p + "ffn_norm.weight", (D,), "f32")
        Fe = hp["expert_ff"]
        self.experts_tensor(b + "ffn_gate_exps.weight", p, "w1", (E, Fe, D))
        self.experts_tensor(b + "ffn_up_exps.weight", p, "w3", (E, Fe, D))
        self.experts_tensor(b + "ffn_down_exps.weight", p, "w2", (E, D, Fe))
        ft(b + "ffn_gate_shexp.weight", p + "ffn.shared_experts.w1.weight", (F, D), "w")
        ft(b + "ffn_up_shexp.weight", p + "ffn.shared_experts.w3.weight", (F, D), "w")
        ft(b + "ffn_down_shexp.weight", p + "ffn.shared_experts.w2.weight", (D, F), "w")

    def leftovers(self) -> tuple[list[str], list[str]]:
        """(skipped on purpose, unexpected) checkpoint tensors."""
        skipped, unexpected = list(self.dropped), []
        for name in self.ck.entries:
            if name in self.consumed or name in self.dropped:
                continue
            if name.startswith(("vision.", "aligner.", "image_")) or \
                    (name.startswith("mtp.") and (not self.mtp or name.startswith("mtp.0.hc_head_")
                                                   or not name.startswith("mtp.0."))):
                skipped.append(name)
            else:
                unexpected.append(name)
        return skipped, unexpected
